"""SD3 / SD3.5 (MMDiT): file layouts (`layout`, torch-free), weights loading and saving (`weights`), tiny test models
(`tiny`)."""

"""FLUX.1 (dev, schnell) and Chroma: file layouts (`layout`, torch-free), loading and saving (`weights`), tiny
test models (`tiny`)."""

"""sd-scripts' networks/convert_hunyuan_image_lora_to_comfy.py: rename a HunyuanImage-2.1 LoRA's modules between
sd-scripts' names and ComfyUI's (`--reverse` for ComfyUI -> sd-scripts). The renaming lives in the family package.

    python -m sd_scripts.networks.convert_hunyuan_image_lora_to_comfy SRC DST [--reverse]
"""
import sys

from ..families.hunyuan_image.lora_files import comfy_main

if __name__ == "__main__":
    sys.exit(comfy_main())

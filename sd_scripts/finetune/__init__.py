"""Captioning and tagging tools under sd-scripts' `finetune/` names: `python -m sd_scripts.finetune.<tool>`
(tag_images_by_wd14_tagger, make_captions, make_captions_by_git, make_captions_by_florence2). Models come from a
local folder or the user's Hugging Face cache; nothing is downloaded."""

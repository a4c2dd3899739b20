"""The Utilities tab: dataset preparation, the tools (LoRA merge / extract / resize / check, and every tool of
`sd_scripts.tools.registry`, each a form run as a job: tabs/tools.py) and the caption editor (tabs/captions.py).

Dataset preparation: raw images + instance/class prompts + repeats (+ optional regularisation images) become the
'<repeats>_<tokens>' folder layout the trainers read; it shows the images per concept and the steps per epoch, and
fills the LoRA tab's Folders fields.
"""
from __future__ import annotations

import html
import math
import os
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from kohya_gui.app import AppContext
    from kohya_gui.tabs.training import TrainingTab


class UtilitiesTab:
    def __init__(self, ctx: "AppContext", tabs: "list[TrainingTab]", watched: gr.State):
        from kohya_gui.tabs.captions import CaptionEditor
        from kohya_gui.tabs.tools import ToolsPanel

        self.ctx, self.lora_tab = ctx, tabs[0]
        lora_tab = tabs[0]
        with gr.Tab("Utilities", id="utilities", elem_id="tab-utilities"), gr.Tabs(elem_id="utilities-tabs"):
            with gr.Tab("Tools", id="utilities-tools", elem_id="utilities-tools"):
                self.tools = ToolsPanel(ctx, tabs, watched)
            with gr.Tab("Caption editor", id="utilities-captions", elem_id="utilities-captions"):
                self.captions = CaptionEditor(ctx)
            with gr.Tab("Dataset preparation", id="utilities-prep", elem_id="utilities-prep"):
                self._prep_widgets()
        form = lora_tab.form
        self.targets = [name for name in ("train_data_dir", "reg_data_dir", "output_dir", "logging_dir")
                        if name in form.options]
        self.prepare.click(self._prepare, [self.images_dir, self.destination, self.instance_prompt, self.class_prompt,
                                           self.repeats, self.reg_dir, self.reg_repeats, self.batch_size],
                           [self.summary, *(form.widget(n) for n in self.targets)])

    def _prep_widgets(self) -> None:
        gr.Markdown("### Dataset preparation\nCopies your images into the folder layout the trainers read "
                    "(`<repeats>_<instance prompt> <class prompt>`), with regularisation images beside them, "
                    "and fills the LoRA tab's folders.")
        with gr.Row():
            self.images_dir = gr.Textbox(label="Raw images folder", placeholder="path to a folder of images",
                                         elem_id="prep-images")
            self.destination = gr.Textbox(label="Destination folder",
                                          placeholder="folder to create img/, reg/, model/, log/ in",
                                          elem_id="prep-destination")
        with gr.Row():
            self.instance_prompt = gr.Textbox(label="Instance prompt", placeholder="e.g. sks",
                                              elem_id="prep-instance")
            self.class_prompt = gr.Textbox(label="Class prompt", placeholder="e.g. dog", elem_id="prep-class")
            self.repeats = gr.Number(label="Repeats", value=10, precision=0, elem_id="prep-repeats")
        with gr.Row():
            self.reg_dir = gr.Textbox(label="Regularisation images folder (optional)",
                                      placeholder="path to a folder of class images", elem_id="prep-reg")
            self.reg_repeats = gr.Number(label="Regularisation repeats", value=1, precision=0,
                                         elem_id="prep-reg-repeats")
            self.batch_size = gr.Number(label="Batch size (for steps per epoch)", value=1, precision=0,
                                        elem_id="prep-batch")
        self.prepare = gr.Button("Prepare dataset and fill the LoRA tab", variant="primary", elem_id="prep-run")
        self.summary = gr.Markdown(elem_id="prep-summary")

    def _prepare(self, images_dir, destination, instance_prompt, class_prompt, repeats, reg_dir, reg_repeats,
                 batch_size):
        from kohya_gui.dataset_prep import prepare_dataset

        destination = (destination or "").strip()
        try:
            if not destination:
                raise ValueError("Destination folder: type the folder to create the dataset in")
            result = prepare_dataset(
                raw_images_dir=(images_dir or "").strip(), out_dir=destination,
                instance_prompt=(instance_prompt or "").strip(), class_prompt=(class_prompt or "").strip(),
                repeats=int(repeats or 0), reg_images_dir=(reg_dir or "").strip() or None,
                reg_repeats=int(reg_repeats or 1))
        except (OSError, ValueError) as e:
            return [f"**Not prepared:** {html.escape(str(e))}", *(gr.skip() for _ in self.targets)]
        root = os.path.dirname(result.train_data_dir)
        filled = {"train_data_dir": result.train_data_dir, "reg_data_dir": result.reg_data_dir or "",
                  "output_dir": os.path.join(root, "model"), "logging_dir": os.path.join(root, "log")}
        return [summary_markdown(result, int(batch_size or 1)), *(filled[name] for name in self.targets)]


def summary_markdown(result: Any, batch_size: int) -> str:
    """Images per concept folder and steps per epoch at the given batch size."""
    lines = ["| concept folder | images | repeats | images x repeats |", "|---|---|---|---|"]
    for folder, images in result.counts.items():
        repeats = _repeats(folder)
        lines.append(f"| `{html.escape(folder)}` | {images} | {repeats} | {images * repeats} |")
    steps = math.ceil(result.steps_per_epoch / max(1, batch_size))
    lines.append(f"\n**Steps per epoch** at batch size {batch_size}: **{steps}**"
                 + (" (regularisation images double the steps)" if result.reg_data_dir else ""))
    if getattr(result, "captions", 0):
        lines.append(f"\n{result.captions} caption file(s) came along.")
    lines.append(f"\nTraining images: `{html.escape(result.train_data_dir)}`. The LoRA tab's folders are filled.")
    return "\n".join(lines)


def _repeats(folder: str) -> int:
    head = os.path.basename(folder).split("_", 1)[0]
    return int(head) if head.isdigit() else 1

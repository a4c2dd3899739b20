"""'Browse server files': pick a file or folder on the server for any path field of a training tab, and upload a
dataset zip into the folder shown. Listing and extraction stay inside the roots config.toml allows (see
file_browser.py and uploads.py); the chosen path is written into the field, where pre-flight checks it as usual.
"""
from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING, Any

import gradio as gr

from kohya_gui.file_browser import BrowseError
from kohya_gui.uploads import UploadError

if TYPE_CHECKING:
    from kohya_gui.app import AppContext
    from kohya_gui.components.form import TrainingForm

UP = ".. (parent folder)"


class PathPicker:
    """The browser widgets of one training tab; `targets` are the form's path fields."""

    def __init__(self, ctx: "AppContext", form: "TrainingForm", prefix: str):
        self.ctx, self.form = ctx, form
        self.targets = {opt.name: widget for opt, widget in form.options.values()
                        if opt.path and opt.name not in ("events_file", "control_dir")}
        labels = [(form.options[name][0].title, name) for name in self.targets]
        with gr.Accordion("Browse server files (pick paths, upload a dataset zip)", open=False,
                          elem_id=f"{prefix}-browser"):
            with gr.Row(equal_height=True):
                self.target = gr.Dropdown(labels, value="train_data_dir" if "train_data_dir" in self.targets
                                          else labels[0][1], label="Field to fill", scale=2,
                                          elem_id=f"{prefix}-browse-target")
                self.folder = gr.Textbox(label="Folder", scale=4, elem_id=f"{prefix}-browse-folder")
                self.go = gr.Button("Go", scale=0, elem_id=f"{prefix}-browse-go")
            self.entries = gr.Radio([], label="Contents (folders end with /)", elem_id=f"{prefix}-browse-entries")
            with gr.Row():
                self.open = gr.Button("Open folder", elem_id=f"{prefix}-browse-open")
                self.use = gr.Button("Use selected (or this folder) for the field", variant="primary",
                                     elem_id=f"{prefix}-browse-use")
            with gr.Row(equal_height=True):
                self.upload = gr.File(label="Dataset zip", file_types=[".zip"], type="filepath", scale=3,
                                      elem_id=f"{prefix}-browse-upload")
                self.extract = gr.Button("Extract into this folder", scale=1, elem_id=f"{prefix}-browse-extract")
            self.message = gr.Markdown(elem_id=f"{prefix}-browse-message")
        listing = [self.folder, self.entries, self.message]
        self.go.click(self.show, self.folder, listing, show_progress="hidden")
        self.folder.submit(self.show, self.folder, listing, show_progress="hidden")
        self.open.click(self.enter, [self.folder, self.entries], listing, show_progress="hidden")
        self.use.click(self.choose, [self.target, self.folder, self.entries],
                       [*self.targets.values(), self.message], show_progress="hidden")
        self.extract.click(self.unzip, [self.upload, self.folder], listing, show_progress="hidden")

    def show(self, folder: str | None, note: str = ""):
        """List `folder` (the first allowed root when empty)."""
        try:
            real, entries = self.ctx.browser.listing(folder)
        except BrowseError as e:
            return gr.skip(), gr.skip(), f"**Not shown:** {html.escape(str(e))}"
        choices = ([UP] if self.ctx.browser.parent(real) != real else []) + \
            [e.name + ("/" if e.is_dir else "") for e in entries]
        return real, gr.update(choices=choices, value=None), note

    def enter(self, folder: str | None, entry: str | None):
        if not entry:
            return self.show(folder)
        if entry == UP:
            return self.show(self.ctx.browser.parent(folder or self.ctx.browser.home))
        return self.show(os.path.join(folder or self.ctx.browser.home, entry.rstrip("/")))

    def choose(self, target: str, folder: str | None, entry: str | None) -> list[Any]:
        """Write the chosen path (checked to be inside the roots) into the target field."""
        skip = [gr.skip() for _ in self.targets]
        if target not in self.targets:
            return [*skip, "Choose the field to fill first."]
        try:
            base = self.ctx.browser.resolve(folder)
            path = self.ctx.browser.resolve(os.path.join(base, entry.rstrip("/"))) if entry and entry != UP \
                else base
        except BrowseError as e:
            return [*skip, f"**Not used:** {html.escape(str(e))}"]
        out = [path if name == target else gr.skip() for name in self.targets]
        return [*out, f"`{html.escape(target)}` = `{html.escape(path)}`"]

    def unzip(self, upload: str | None, folder: str | None):
        if not upload:
            return gr.skip(), gr.skip(), "Choose a .zip file to upload first."
        try:
            target = self.ctx.extract_upload(upload, folder)
        except (UploadError, BrowseError, OSError) as e:
            return gr.skip(), gr.skip(), f"**Not extracted:** {html.escape(str(e))}"
        return self.show(os.path.dirname(target), f"Extracted into `{html.escape(target)}`.")

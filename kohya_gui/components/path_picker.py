"""'Browse server files': pick a file or folder on the server for any path field of a training tab, and upload a
dataset zip into the folder shown. Listing and extraction stay inside the roots config.toml allows (see
file_browser.py and uploads.py); the chosen path is written into the field, where pre-flight checks it as usual.
"""
from __future__ import annotations

import html
import os
import shlex
from typing import TYPE_CHECKING, Any

import gradio as gr

from kohya_gui.file_browser import BrowseError
from kohya_gui.uploads import UploadError

if TYPE_CHECKING:
    from kohya_gui.app import AppContext
    from kohya_gui.components.form import TrainingForm

UP = ".. (parent folder)"


def form_targets(form: "TrainingForm") -> dict[str, tuple[str, gr.components.Component]]:
    """A training form's path fields: {option name: (label, widget)}."""
    return {opt.name: (opt.title, widget) for opt, widget in form.options.values()
            if opt.path and opt.name not in ("events_file", "control_dir")}


class PathPicker:
    """The browser widgets of one form. `targets`: {field name: (label, widget)} (a TrainingForm: its path fields);
    the fields named in `multiple` hold a list of paths, and a chosen path is added to the list."""

    def __init__(self, ctx: "AppContext", form: "TrainingForm | dict", prefix: str, multiple: tuple[str, ...] = ()):
        self.ctx = ctx
        targets = form if isinstance(form, dict) else form_targets(form)
        self.targets = {name: widget for name, (_, widget) in targets.items()}
        self.multiple = {name: self.targets[name] for name in multiple if name in self.targets}
        labels = [(label + (" (adds to the list)" if name in self.multiple else ""), name)
                  for name, (label, _) in targets.items()]
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
        self.use.click(self.choose, [self.target, self.folder, self.entries, *self.multiple.values()],
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

    def choose(self, target: str, folder: str | None, entry: str | None, *lists: str) -> list[Any]:
        """Write the chosen path (checked to be inside the roots) into the target field (a list field: added to the
        paths it holds; `lists` are those fields' current values)."""
        skip = [gr.skip() for _ in self.targets]
        if target not in self.targets:
            return [*skip, "Choose the field to fill first."]
        try:
            base = self.ctx.browser.resolve(folder)
            path = self.ctx.browser.resolve(os.path.join(base, entry.rstrip("/"))) if entry and entry != UP \
                else base
        except BrowseError as e:
            return [*skip, f"**Not used:** {html.escape(str(e))}"]
        value = path
        if target in self.multiple:
            current = dict(zip(self.multiple, lists)).get(target) or ""
            value = f"{current} {shlex.quote(path)}".strip()
        out = [value if name == target else gr.skip() for name in self.targets]
        return [*out, f"`{html.escape(target)}` = `{html.escape(path)}`"]

    def unzip(self, upload: str | None, folder: str | None):
        if not upload:
            return gr.skip(), gr.skip(), "Choose a .zip file to upload first."
        try:
            target = self.ctx.extract_upload(upload, folder)
        except (UploadError, BrowseError, OSError) as e:
            return gr.skip(), gr.skip(), f"**Not extracted:** {html.escape(str(e))}"
        return self.show(os.path.dirname(target), f"Extracted into `{html.escape(target)}`.")

"""The caption editor: a page of thumbnails of a dataset folder with their captions, edited and saved in place; the
tags over the whole folder with their counts; search / replace over every caption, previewed before it is written.
File access goes through `kohya_gui.captions` (confined to the file browser's roots and to the chosen folder).
"""
from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING, Any

import gradio as gr

from kohya_gui.captions import CaptionError, CaptionFolder, thumbnail
from kohya_gui.components.path_picker import PathPicker

if TYPE_CHECKING:
    from kohya_gui.app import AppContext

PER_PAGE = 8
COLUMNS = 4
MAX_CHIPS = 150
PREVIEW_LINES = 5
MODES = [("Text (every occurrence)", "text"), ("Whole tag (empty replacement removes it)", "tag"),
         ("Regular expression", "regex")]


class CaptionEditor:
    def __init__(self, ctx: "AppContext"):
        self.ctx = ctx
        self.thumbs = os.path.join(ctx._gallery_dir, "thumbs")
        gr.Markdown("Edit the captions of a dataset folder (sub-folders included). Captions are saved in place, "
                    "each file replaced atomically.")
        with gr.Row(equal_height=True):
            self.folder = gr.Textbox(label="Dataset folder", placeholder="path to a folder of images", scale=4,
                                     elem_id="caption-folder")
            self.extension = gr.Textbox(label="Caption extension", value=".txt", scale=1,
                                        elem_id="caption-extension")
            self.separator = gr.Textbox(label="Tag separator", value=",", scale=1, elem_id="caption-separator")
            self.load = gr.Button("Load", variant="primary", scale=0, elem_id="caption-load")
        PathPicker(ctx, {"caption_folder": ("Dataset folder", self.folder)}, "caption")
        self.status = gr.Markdown(elem_id="caption-status")
        with gr.Row(equal_height=True):
            self.prev = gr.Button("◀ Previous", scale=0, elem_id="caption-prev")
            self.page = gr.Number(label="Page", value=1, precision=0, minimum=1, scale=0, elem_id="caption-page")
            self.next = gr.Button("Next ▶", scale=0, elem_id="caption-next")
        self.images: list[gr.Image] = []
        self.texts: list[gr.Textbox] = []
        for start in range(0, PER_PAGE, COLUMNS):
            with gr.Row():
                for i in range(start, start + COLUMNS):
                    with gr.Column(min_width=160):
                        self.images.append(gr.Image(height=150, interactive=False, show_label=False, buttons=[],
                                                    visible=False, elem_id=f"caption-image-{i}"))
                        self.texts.append(gr.Textbox(lines=2, visible=False, elem_id=f"caption-text-{i}"))
        self.save = gr.Button("Save the changed captions of this page", elem_id="caption-save")
        self.save_message = gr.Markdown(elem_id="caption-save-message")
        with gr.Accordion("Tags over the folder (captions holding each)", open=True, elem_id="caption-tags-box"):
            self.tags = gr.HTML(elem_id="caption-tags")
        with gr.Accordion("Search and replace over every caption", open=True, elem_id="caption-replace-box"):
            with gr.Row(equal_height=True):
                self.find = gr.Textbox(label="Find", elem_id="caption-find")
                self.replace = gr.Textbox(label="Replace with", elem_id="caption-replace")
                self.mode = gr.Dropdown(MODES, value="text", label="Match", elem_id="caption-mode")
            with gr.Row():
                self.preview = gr.Button("Preview", elem_id="caption-preview")
                self.apply = gr.Button("Replace in all captions", variant="stop", elem_id="caption-apply")
            self.replace_result = gr.Markdown(elem_id="caption-replace-result")
        self.shown = gr.State([])  # [(image path, text as loaded)] of the page shown

        where = [self.folder, self.extension, self.separator]
        page_outputs = [self.status, self.page, *self.images, *self.texts, self.shown, self.tags]
        self.load.click(lambda f, e, s: self.show(f, e, s, 1), where, page_outputs, show_progress="hidden")
        self.page.submit(self.show, [*where, self.page], page_outputs, show_progress="hidden")
        self.prev.click(lambda f, e, s, p: self.show(f, e, s, (p or 1) - 1), [*where, self.page], page_outputs,
                        show_progress="hidden")
        self.next.click(lambda f, e, s, p: self.show(f, e, s, (p or 1) + 1), [*where, self.page], page_outputs,
                        show_progress="hidden")
        self.save.click(self.save_page, [*where, self.page, self.shown, *self.texts],
                        [self.save_message, *page_outputs], show_progress="hidden")
        self.preview.click(self.preview_replace, [*where, self.find, self.replace, self.mode], self.replace_result,
                           show_progress="hidden")
        self.apply.click(self.apply_replace, [*where, self.page, self.find, self.replace, self.mode],
                         [self.replace_result, *page_outputs], show_progress="hidden")

    def _open(self, folder: str | None, extension: str | None) -> CaptionFolder:
        if not (folder or "").strip():
            raise CaptionError("type or pick the dataset folder first")
        return CaptionFolder(self.ctx.browser, folder, extension or ".txt")

    # ---- the page
    def show(self, folder: str | None, extension: str | None, separator: str | None, page: Any) -> list:
        try:
            captions = self._open(folder, extension)
        except (CaptionError, ValueError, OSError) as e:
            return [f"**Not loaded:** {html.escape(str(e))}", *(gr.skip() for _ in range(2 * PER_PAGE + 3))]
        pages = captions.pages(PER_PAGE)
        number = min(max(1, int(page or 1)), pages)
        try:
            items = captions.page(number, PER_PAGE)
        except CaptionError as e:
            return [f"**Not loaded:** {html.escape(str(e))}", *(gr.skip() for _ in range(2 * PER_PAGE + 3))]
        images, texts = [], []
        for i in range(PER_PAGE):
            if i < len(items):
                item = items[i]
                images.append(gr.update(value=thumbnail(item.image, self.thumbs), visible=True))
                texts.append(gr.update(value=item.text, label=os.path.relpath(item.image, captions.folder),
                                       visible=True))
            else:
                images.append(gr.update(value=None, visible=False))
                texts.append(gr.update(value="", visible=False))
        status = (f"`{html.escape(captions.folder)}`: **{len(captions.images)}** images, page **{number}** of "
                  f"{pages}" if captions.images else f"`{html.escape(captions.folder)}` holds no images")
        shown = [(item.image, item.text) for item in items]
        return [status, number, *images, *texts, shown, tags_html(captions, separator or ",")]

    def save_page(self, folder, extension, separator, page, shown, *texts):
        try:
            captions = self._open(folder, extension)
            saved = [image for (image, before), text in zip(shown or [], texts)
                     if text != before and captions.save(image, text)]
        except (CaptionError, ValueError, OSError) as e:
            return [f"**Not saved:** {html.escape(str(e))}", *(gr.skip() for _ in range(2 * PER_PAGE + 4))]
        names = ", ".join(f"`{html.escape(os.path.basename(p))}`" for p in saved[:8])
        message = f"Saved {len(saved)} caption(s){': ' + names if saved else ' (nothing changed)'}."
        return [message, *self.show(folder, extension, separator, page)]

    # ---- search and replace
    def preview_replace(self, folder, extension, separator, find, replace, mode) -> str:
        try:
            changes = self._open(folder, extension).changes(find or "", replace or "", mode, separator or ",")
        except (CaptionError, ValueError, OSError) as e:
            return f"**Not previewed:** {html.escape(str(e))}"
        if not changes:
            return "No caption would change."
        lines = [f"**{len(changes)}** caption file(s) would change. First ones:", ""]
        for change in changes[:PREVIEW_LINES]:
            lines.append(f"- `{html.escape(os.path.basename(change.caption_path))}`: "
                         f"{html.escape(change.old[:120])} → **{html.escape(change.new[:120])}**")
        return "\n".join(lines)

    def apply_replace(self, folder, extension, separator, page, find, replace, mode):
        try:
            captions = self._open(folder, extension)
            written = captions.apply(captions.changes(find or "", replace or "", mode, separator or ","))
        except (CaptionError, ValueError, OSError) as e:
            return [f"**Not replaced:** {html.escape(str(e))}", *(gr.skip() for _ in range(2 * PER_PAGE + 4))]
        return [f"Replaced in **{written}** caption file(s).", *self.show(folder, extension, separator, page)]


def tags_html(captions: CaptionFolder, separator: str) -> str:
    """Chips 'tag N' for the folder's tags, most frequent first."""
    counts = captions.tag_counts(separator)
    if not counts:
        return '<div class="kg-tags">No tags yet.</div>'
    chips = "".join(f'<span class="kg-chip" title="{html.escape(tag)}">{html.escape(tag)} <b>{n}</b></span> '
                    for tag, n in counts.most_common(MAX_CHIPS))
    more = f" … and {len(counts) - MAX_CHIPS} more" if len(counts) > MAX_CHIPS else ""
    return f'<div class="kg-tags">{len(counts)} tags: {chips}{more}</div>'

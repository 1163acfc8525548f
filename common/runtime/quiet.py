"""Our messages, not library chatter (issue 17, item 7).

`quiet()`, called once at the start of a stage, drops the library messages a SegGen run expects and can
do nothing about, by their text, so that any other warning of the same libraries still shows:

- transformers' "`XImageProcessor` requires torchvision (not installed); falling back to `XImageProcessorPil`"
  (diffusers' pipelines import CLIP/Siglip image processors; torchvision is not a requirement);
- the tokenizers' "Token indices sequence length is longer than ..." and diffusers' "The following part of
  your input was truncated because CLIP can only handle ..." (once per batch): `caption_cut_note()` says it
  once instead, naming the captions;
- Mask2Former's LOAD REPORT when the only mismatched weights are the class head that re-heading replaces
  (`ignore_mismatched_sizes=True`), and its "num_labels=N which is incompatible to the id2label map";
  any other key in the report (missing, unexpected weights) still shows the whole table;
- kernels' "Skipping publisher trust check for 'kernels-community/...' because Hugging Face Hub is in offline
  mode" (bitsandbytes loads its CPU kernels through it while it is imported; filtered on import of this module);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward ... kernels" (logger lowered to ERROR when this module
  is imported: the warning comes while bitsandbytes is imported, before a stage calls `quiet()`);
- diffusers' "There are modules in UNet2DConditionModel that should be kept in float32: []" on `.to(dtype)`
  (the list is empty: nothing to keep; a non-empty list still shows);
- torch's "This DataLoader will create N worker processes in total" (common/runtime/threads.py picks a count
  that fits; `Plan.workers_note()` is our line when a user asks for more workers than cores);
- the per-file progress bars of transformers / diffusers / huggingface_hub (a stage has its own).

Not here: accelerate's "The following values were not passed to `accelerate launch`" comes from the
launcher process, before our script runs; pass the values (`--num_processes 1 --num_machines 1
--mixed_precision no --dynamo_backend no`) or run `accelerate config default` once.

Why filters by text rather than `TRANSFORMERS_VERBOSITY=error`: that also hides the warnings a user needs
(a wrong checkpoint's missing weights, a deprecated argument).
"""

from __future__ import annotations

import logging
import re
import warnings

# (library root logger, pattern of a message we expect and drop)
EXPECTED = [
    ("transformers", re.compile(r"requires torchvision \(not installed\); falling back to")),
    ("transformers", re.compile(r"Token indices sequence length is longer than the specified maximum sequence length")),
    ("transformers", re.compile(r"You passed `num_labels=\d+` which is incompatible to the `id2label` map")),
    ("diffusers", re.compile(r"The following part of your input was truncated because CLIP can only handle")),
    # `.to(dtype)` on a model whose list of modules to keep in float32 is empty: nothing is kept, nothing is wrong
    ("diffusers", re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")),
    # bitsandbytes loads its CPU kernels through `kernels`, which cannot check their publisher offline (every stage)
    ("kernels", re.compile(r"Skipping publisher trust check for '.*' because Hugging Face Hub is in offline mode")),
]
# bitsandbytes warns while it is imported (by diffusers/transformers, before a stage calls quiet()): lower its
# logger now, as stage scripts import this module first.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# Weights a re-headed Mask2Former re-initialises: the class predictor and the loss's empty-class weight.
HEAD_KEYS = re.compile(r"^(class_predictor\.(weight|bias)|criterion\.empty_weight)$")
_ROW = re.compile(r"^\s*([\w.]+)\s*\|\s*(\w+)\s*\|")


def head_only_load_report(message: str) -> bool:
    """True for a transformers LOAD REPORT whose rows are all size MISMATCHes of the class head."""
    if "LOAD REPORT" not in message:
        return False
    rows = [m.groups() for m in map(_ROW.match, message.splitlines()) if m and m.group(1) != "Key"]
    return bool(rows) and all(HEAD_KEYS.match(key) and "MISMATCH" in status for key, status in rows)


class ExpectedMessages(logging.Filter):
    """Drops the records of one library whose message is expected (EXPECTED, head-only LOAD REPORTs)."""

    def __init__(self, library: str):
        super().__init__()
        self.patterns = [p for lib, p in EXPECTED if lib == library]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (any(p.search(message) for p in self.patterns) or head_only_load_report(message))


# `kernels` warns while bitsandbytes is imported, through its module's own logger and Python's last-resort
# handler: the filter sits on that logger, now, as stage scripts import this module first.
logging.getLogger("kernels._internals.hf_hub").addFilter(ExpectedMessages("kernels"))


def _library_handlers(library: str) -> list[logging.Handler]:
    """The handlers of transformers' / diffusers' library root logger (created on first use)."""
    if library == "transformers":
        from transformers.utils import logging as lib_logging
    else:
        from diffusers.utils import logging as lib_logging
    lib_logging.get_logger(library)  # configures the library root logger and its stderr handler
    return logging.getLogger(library).handlers


def quiet() -> None:
    """Silence the expected library messages and progress bars for the rest of the process (idempotent)."""
    for library in ("transformers", "diffusers"):
        for handler in _library_handlers(library):
            if not any(isinstance(f, ExpectedMessages) for f in handler.filters):
                handler.addFilter(ExpectedMessages(library))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes in total")

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def caption_cut_note(tokenizer, captions: dict[str, str], source: str = "captions") -> str | None:
    """One line naming the captions longer than the text encoder reads (CLIP: 77 tokens with its start and
    end tokens), or None when all fit. `captions` maps an id (a sample id, a line number) to its text;
    `source` names where they come from (the captions file)."""
    limit = tokenizer.model_max_length
    ids = list(captions)
    lengths = [len(t) for t in tokenizer([captions[i] for i in ids], truncation=False, verbose=False).input_ids]
    cut = [(i, n) for i, n in zip(ids, lengths) if n > limit]
    if not cut:
        return None
    first, n = cut[0]
    kept = tokenizer.decode(tokenizer(captions[first], truncation=True, max_length=limit).input_ids, skip_special_tokens=True)
    tail = kept.strip().split()[-4:]
    return (f"{source}: {len(cut)} of {len(ids)} captions are longer than the text encoder's {limit} tokens and are cut "
            f"(the model does not see the rest); first: {first} ({n} tokens), cut after '… {' '.join(tail)}'")

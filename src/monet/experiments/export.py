"""`monet edits export`: an edited model as a checkpoint that any Hugging Face client evaluates.

Experts are products of two halves (paper Eq. 9-15: expert (i, j) is built from bottom half i and top half
j, each shared by E experts), so no change to the weights deletes one expert and nothing else. The edit
therefore travels beside the unchanged weights, in `expert_edits.safetensors` (`monet.edits`: per layer,
the ids of the edited experts and the share of each one's term to remove), and `MonetForCausalLM.
from_pretrained` applies it at load. Every loader goes through that method: `load_checkpoint`, and
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, whose `auto_map` names the shim that
re-exports our classes (`monet.remote_code`), so `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` evaluates the edited model.

The experts of a label are chosen as `monet unlearn` chooses them (the atlas's per-label routing mass,
`select_for_label` with the same --ratio and --min-mass), so an export reproduces the model that
`unlearn --lm-eval-task` evaluated in memory.

    monet edits export RUN --atlas ATLAS --label chemistry --out runs/no-chemistry
    lm_eval --model hf --model_args pretrained=runs/no-chemistry,trust_remote_code=True --tasks ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monet.checkpoint import load_checkpoint, read_manifest, resolve_checkpoint, save_model_files, write_manifest
from monet.edits import apply_edits, apply_steering, current_weights, model_shape
from monet.errors import MonetError
from monet.experiments.unlearn import atlas_label_means, select_for_label
from monet.interp.query import Atlas
from monet.interp.units import units_of
from monet.io import output_directory, printable
from monet.settings import EditsExport

KIND = "edits export"
NOUN = "an exported checkpoint"


def export_command(cmd: EditsExport) -> Path:
    """Apply the label deletions, --edits and --steer of `cmd` to the checkpoint and write it to `cmd.out`."""
    source = resolve_checkpoint(cmd.run, verify=not cmd.no_verify)   # files checked once, here
    model, _ = load_checkpoint(source, verify=False)   # the tokenizer too: checked to fit the model
    units_of(model, "monet", cmd.run, hint=": expert edits need a Monet model")
    record: dict[str, Any] = {"source": str(source), "labels": {}, "steer": list(cmd.steer), "edits_file": cmd.edits}
    if cmd.label:
        atlas = Atlas(cmd.atlas, model=model)
        labels, means = atlas_label_means(atlas)
        experts = model_shape(model)[0]
        for label in dict.fromkeys(cmd.label):
            selection = select_for_label(means, labels, label, cmd.ratio, cmd.min_mass)
            apply_edits(model, selection.to_edits(experts))
            record["labels"][label] = selection.summary()
        record.update(atlas=str(cmd.atlas), ratio=cmd.ratio, min_mass=cmd.min_mass)
    apply_steering(model, cmd.steer, cmd.edits)
    if all(table is None for table in current_weights(model).values()):
        picked = ", ".join(cmd.label)
        raise MonetError(f"no expert is edited: no expert is skewed towards {picked} at --ratio {cmd.ratio}; lower "
                         "--ratio (or build the atlas on more --max-tokens)" if cmd.label
                         else "no expert is edited: the --steer / --edits given change nothing")
    metadata = {key: value for key, value in (read_manifest(source) or {}).items() if key in ("step", "seq_len")}
    with output_directory(cmd.out, KIND, force=cmd.force, noun=NOUN) as tmp:
        save_model_files(tmp, model, tokenizer_dir=source)
        write_manifest(tmp, {**metadata, "exported_edits": record})
    for label, summary in record["labels"].items():
        print(printable(f"{label}: {summary['selected']} experts deleted "
                        f"({100 * summary['masking_ratio']:.3f} % of all)"))
    return Path(cmd.out)


__all__ = ["export_command"]

"""Reading the SpecForge anchor's offline features, so that specdec trains on byte-identical inputs in the
throughput side-by-side (issue #16): the records `scripts/prepare_hidden_states.py` wrote (token ids, loss
mask, the three aux layers and the final-norm output of SmolLM2), the draft vocabulary it derived, and the
order its trainer visits them in. The anchor (../shared/anchors/specforge, `run.sh`) builds them with SpecForge
commit a6b6b0230009d15ec2a97a57384e6f53f0f96946; the record layout, the file listing and the shuffle are that
commit's `specforge/offline_capture/hf.py` (anchor patch), `specforge/algorithms/common/providers.py`
(`OfflineCaptureLayout`), `specforge/runtime/data_plane/offline_reader.py` and `specforge/launch.py`
(`_distributed_sampler_indices`).
"""

import json
import re
from pathlib import Path

import torch

SPECFORGE_COMMIT = "a6b6b0230009d15ec2a97a57384e6f53f0f96946"
FILE_GROUP_SIZE = 2000  # prepare_hidden_states.py --file-group-size default: data_<i> lives in rows_<g>-<g+2000>
NUM_AUX_LAYERS = 3  # EAGLE-3 captures three layers; SpecForge's default ids [1, L/2-1, L-4] (model_providers.py)
_RUN_FIRST = (
    "Build it with `bash ../shared/anchors/specforge/run.sh --target smollm2 --ttt-length 4 --lr 1e-3 --steps 3 "
    "--wait-quiet 0` (after the anchor's setup.sh; see its README)"
)
_RECORD_NAME = re.compile(r"data_(\d+)\.ckpt")


def _relative_path(index: int) -> str:
    group = index // FILE_GROUP_SIZE * FILE_GROUP_SIZE
    return f"rows_{group}-{group + FILE_GROUP_SIZE}/data_{index}.ckpt"


def _record_paths(features_dir: Path) -> list[Path]:
    """The record files by record index, checked complete: indices 0..n-1, each where SpecForge puts it."""
    if not features_dir.is_dir():
        raise FileNotFoundError(f"SpecForge features dir {features_dir} does not exist. {_RUN_FIRST}.")
    done = features_dir / "DONE.json"
    if not done.is_file():
        raise FileNotFoundError(
            f"{done} is missing: the anchor's capture into {features_dir} did not finish. Delete the dir and rerun "
            f"the anchor's run.sh: {_RUN_FIRST}."
        )
    expected = json.loads(done.read_text())["samples"]
    compressed = sorted(features_dir.rglob("*.ckpt.gz"))
    if compressed:
        raise ValueError(
            f"{compressed[0]} is gzip-compressed (prepare_hidden_states.py --compress); only the plain .ckpt records "
            "the anchor writes are read here. Capture again without --compress."
        )
    by_index = {}
    for path in features_dir.rglob("*.ckpt"):
        match = _RECORD_NAME.fullmatch(path.name)
        if match is None:
            # SpecForge's trainer trains on every *.ckpt below the dir, so a stray file changes its order.
            raise ValueError(f"{path} is not a data_<i>.ckpt record, but SpecForge would train on it. Remove it.")
        index = int(match.group(1))
        if path.relative_to(features_dir).as_posix() != _relative_path(index):
            raise ValueError(
                f"{path} is not where prepare_hidden_states.py puts record {index} ({_relative_path(index)}), so "
                "SpecForge's order would differ from specforge_order. Capture again with the default --file-group-size."
            )
        by_index[index] = path
    missing = sorted(set(range(expected)) - set(by_index))
    extra = sorted(set(by_index) - set(range(expected)))
    if missing or extra:
        raise ValueError(
            f"{features_dir} should hold records data_0..data_{expected - 1} ({done}), but records {missing[:5]} are "
            f"missing and {extra[:5]} are extra (prepare_hidden_states.py skips a record with a NaN). Delete the dir "
            f"and rerun the anchor's run.sh: {_RUN_FIRST}."
        )
    return [by_index[index] for index in range(expected)]


def _load_record(path: Path) -> dict[str, torch.Tensor]:
    """One record as {"input_ids", "loss_mask", "hidden"}; see read_specforge_samples for the layout."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    keys = {"input_ids", "loss_mask", "aux_hidden_state", "hidden_state"}
    if not isinstance(record, dict) or set(record) != keys:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path} is not a SpecForge eagle3 record: expected the keys {sorted(keys)}, found {found}. Capture "
            f"again with --strategy eagle3: {_RUN_FIRST}."
        )
    input_ids, loss_mask = record["input_ids"], record["loss_mask"]
    aux, final = record["aux_hidden_state"], record["hidden_state"]
    length = input_ids.shape[0]
    hidden_size = final.shape[-1]
    shapes = {
        "input_ids": (input_ids, (length,), torch.int64),
        "loss_mask": (loss_mask, (length,), torch.int64),
        "aux_hidden_state": (aux, (1, length, NUM_AUX_LAYERS * hidden_size), torch.bfloat16),
        "hidden_state": (final, (1, length, hidden_size), torch.bfloat16),
    }
    for name, (tensor, shape, dtype) in shapes.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{path}: {name} should be {dtype} {list(shape)}, found {tensor.dtype} {list(tensor.shape)}. The "
                f"record is damaged or from another SpecForge version; delete the features dir and rerun: {_RUN_FIRST}."
            )
    if not bool(((loss_mask == 0) | (loss_mask == 1)).all()):
        raise ValueError(f"{path}: loss_mask holds values other than 0 and 1: {loss_mask.unique().tolist()}.")
    # aux_hidden_state is torch.cat(captured layers, dim=-1), layer after layer, so a view splits it back.
    layers = aux[0].view(length, NUM_AUX_LAYERS, hidden_size)
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask.bool(),
        "hidden": torch.cat([layers, final[0].unsqueeze(1)], dim=1),
    }


def read_specforge_samples(features_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Every record below `features_dir`, list position = record index i (the file data_<i>.ckpt).

    Each sample: input_ids int64 [T]; loss_mask bool [T] (True on assistant tokens, as stored: SpecForge's
    trainer itself then sets the last position to False, see specforge/algorithms/eagle3/data.py);
    hidden bfloat16 [T, 4, H], where hidden[:, 0:3] are the three aux layers in SpecForge's capture order (for
    SmolLM2 SpecForge ids [1, 14, 26], decoder-layer outputs = HF output_hidden_states ids [2, 15, 27]) and
    hidden[:, 3] is the final-norm output that the teacher's lm_head reads. The records hold no sample id.
    """
    return [_load_record(path) for path in _record_paths(features_dir)]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def read_specforge_vocab(features_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [V_d], t2d bool [V]) from vocab_mapping/vocab_mapping.pt: target id = draft id + d2t[draft id]."""
    path = features_dir / "vocab_mapping" / "vocab_mapping.pt"
    if not path.is_file():
        raise FileNotFoundError(f"SpecForge vocab mapping {path} does not exist. {_RUN_FIRST}.")
    mapping = torch.load(path, map_location="cpu", weights_only=True)
    d2t, t2d = mapping.get("d2t"), mapping.get("t2d")
    if not (isinstance(d2t, torch.Tensor) and d2t.dtype == torch.int64 and d2t.dim() == 1):
        raise ValueError(
            f"{path}: d2t should be an int64 vector, found {_describe(d2t)}. Delete it and rerun the anchor."
        )
    if not (isinstance(t2d, torch.Tensor) and t2d.dtype == torch.bool and t2d.dim() == 1):
        raise ValueError(
            f"{path}: t2d should be a bool vector, found {_describe(t2d)}. Delete it and rerun the anchor."
        )
    # SpecForge sorts the kept target ids, so draft id i is the i-th kept target id (preprocessing.py).
    kept = t2d.nonzero().squeeze(1)
    if not torch.equal(torch.arange(d2t.shape[0]) + d2t, kept):
        raise ValueError(
            f"{path}: d2t and t2d disagree: draft id + d2t should list the {kept.shape[0]} target ids where t2d is "
            f"True, in order ({d2t.shape[0]} draft ids). The file is damaged; delete it and rerun the anchor."
        )
    return d2t, t2d


def specforge_order(n: int, seed: int, epoch: int) -> list[int]:
    """The record indices SpecForge trains on, in order, for one epoch over records data_0..data_{n-1}.

    SpecForge (one data-parallel rank) lists the record files sorted by path, so data_10 comes before data_2, and
    visits them as torch.randperm(n, generator=manual_seed(seed + epoch)) over that list. The sample ids in its
    logs (`<run_id>:<k>`) are positions k in that list, not record indices.
    """
    by_path = sorted(range(n), key=_relative_path)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [by_path[position] for position in permutation]

"""A training run's state on disk, so that nothing is lost on a crash or a stop: train_state.pt (the trainable
parameters, AdamW's state, every rank's random state) written atomically, refused on --resume when the run's
settings differ, metrics.jsonl cut back to the saved step, and SIGTERM / Ctrl-C turned into a clean stop.
train.py's fit calls these; they know nothing of Owl's model."""
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from owl import UserError


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")  # a stale one, left by a killed save, is simply overwritten
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        # On disk before the rename: otherwise a power loss can persist the rename but not the data, leaving an
        # empty or partial file under the final name where the previous checkpoint used to be.
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # and the rename itself, which lives in the folder's entry
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def differences(saved: dict, now: dict, prefix: str = "") -> list:
    """'NAME A in the checkpoint vs B now' for each setting that differs; model fields by their dotted name."""
    out = []
    for k in list(now) + [k for k in saved if k not in now]:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif isinstance(a, dict) or isinstance(b, dict):
            out.append(f"{prefix}{k} differs")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} in the checkpoint vs {b!r} now")
    return out


def resume_from(path: Path, signature: dict, model, opt, rank: int = 0, device: str = "cpu") -> tuple:
    """Put back the trainable parameters, the optimizer and this rank's random state saved in train_state.pt; returns
    (step, skipped steps). A state made with other settings is refused, naming each difference."""
    if not path.exists():
        print(f"train: --resume: there is no {path} yet, so the stage starts at step 0", file=sys.stderr)
        return 0, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["signature"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as e:
        raise UserError(f"--resume refused: {path} is not a train_state.pt Owl can read ({type(e).__name__}); move it away "
             "to start the stage over")
    diff = differences(saved, signature)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(f"--resume refused: {path} was made with other settings ({shown}); pass the same settings, or start "
             "anew in another --out-dir")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            named[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [{"cpu": state["rng"], "cuda": None}]  # an older file
    mine = rngs[min(rank, len(rngs) - 1)]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(mine["cuda"], device)
    return state["step"], state["skipped"]


def open_log(path: Path, step: int):
    """metrics.jsonl: fresh for a fresh run; on resume, cut back to the saved step, since a run killed after its last
    save logged steps that the resumed run does again (a line cut short by the kill goes too)."""
    kept = []
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    log = open(path, "w")
    log.write("".join(kept))
    return log


class StopRequest:
    """SIGTERM or a first Ctrl-C asks to stop (.asked): the step under way finishes, then the state is saved. A
    second Ctrl-C raises KeyboardInterrupt at once and saves nothing, since the step it lands in may be half applied."""

    def __enter__(self):
        self.asked = False
        self.handlers = {sig: signal.signal(sig, self.ask) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def ask(self, *_):
        self.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *_):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


def save_state(path: Path, model, opt, signature: dict, step: int, skipped: int, rank: int, world: int,
               device: str) -> int:
    """train_state.pt for --resume, with the random state of every rank (dropout, augmentation), CPU and CUDA, so
    that each resumes its own stream. Every rank calls it (the states are gathered); rank 0 writes. Returns step."""
    on_cuda = device.startswith("cuda")
    rngs = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if on_cuda else None}] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if rank == 0:
        atomic_save({"signature": signature, "trainable": trainable_state(model), "optimizer": opt.state_dict(),
                     "step": step, "skipped": skipped, "rng": rngs}, path)
    return step

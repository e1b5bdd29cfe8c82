"""One training process of ``tuneflow.multiproc``: ``python -m torch.distributed.run ... -m tuneflow.train_worker
SPEC``. Every rank runs the same ``fit_with_trainer``; rank 0 saves the model and ``result.json``. Nothing is
logged to MLflow here (no run is active; ``report_to`` is none): the process that started training logs it."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from tuneflow.config import PipelineConfig
from tuneflow.multiproc import MODEL_DIR, RESULT_FILE

log = logging.getLogger("tuneflow.train_worker")


def parent_watch(parent_pid: int):
    """Stops training when the process that started it is gone (killed with SIGKILL, it could not stop torchrun):
    no rank trains on for nobody."""
    from transformers import TrainerCallback

    class ParentWatch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            try:
                os.kill(parent_pid, 0)
                gone = 0
            except ProcessLookupError:
                gone = 1
            # decided by all ranks together: a rank that left alone would leave the others waiting for it
            flag = torch.tensor([gone], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                raise SystemExit(f"the process that started training (pid {parent_pid}) is gone; stopping")

    return ParentWatch()


@record  # torchrun's failure report then carries this rank's traceback
def main(argv: list[str] | None = None) -> int:
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tuneflow.kinds import get_kind
    from tuneflow.train import fit_with_trainer

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    hf_logging.disable_progress_bar()  # bars redraw with carriage returns: noise in the parent's line-by-line log
    cfg = PipelineConfig.model_validate(spec["config"])
    log.info(
        "rank %d of %d: pid %d (torchrun %d), %d torch thread(s)",
        rank,
        world,
        os.getpid(),
        os.getppid(),
        spec["threads"],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    data = load_from_disk(spec["data"])
    trainer, output, seconds, resumed = fit_with_trainer(
        cfg,
        tokenizer,
        data,
        Path(spec["checkpoints"]),
        get_kind(cfg.kind),
        resume=Path(spec["resume"]) if spec["resume"] else None,
        threads=spec["threads"],
        extra_callbacks=(parent_watch(int(spec["parent_pid"])),),
    )
    out = Path(spec["output"])
    trainer.save_model(str(out / MODEL_DIR))  # the best epoch's weights (load_best_model_at_end); rank 0 writes
    if trainer.is_world_process_zero():
        state = trainer.state
        result = {
            "best_metric": state.best_metric,
            "epochs_run": float(state.epoch or 0),
            "steps": int(output.global_step),
            "train_seconds": seconds,
            "log_history": list(state.log_history),
            "resumed_from_step": resumed,
            "processes": world,
        }
        tmp = out / f".{RESULT_FILE}"
        tmp.write_text(json.dumps(result))
        tmp.replace(out / RESULT_FILE)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

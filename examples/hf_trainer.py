"""A Hugging Face `Trainer` for a two-head model, balanced by a balanced_losses weighting.

The model is a tiny BERT built locally from a `BertConfig` (random weights, no download) with
two heads of different output sizes: a sequence classification (4 classes, from the first
token) and a per-token regression (1 output per token). A `Trainer` subclass overrides
`compute_loss` to compute each task's loss and return the weighting's total.

Where the weighting lives: outside the model. Hugging Face saves model weights as safetensors,
which hold tensors only, and every weighting carries its task names as non-tensor extra state;
the weighting is also not part of the model one ships. So:

- its state is saved next to each checkpoint (`weighting.pt`) by a `TrainerCallback` in
  `on_save`, and `MultiTaskTrainer.train(resume_from_checkpoint=...)` loads it back before
  Hugging Face restores the rest;
- `compute_loss` puts it in the model's mode (`Trainer.evaluate` switches the model to eval,
  and an eval-mode weighting applies its weights without updating its statistics);
- CalibratedBalancer, like the default CalibratedWeighting, has no learned parameters; with
  UncertaintyWeighting or IMTLL, override `create_optimizer` to add `weighting.parameters()` to
  the optimizer.

The model is an ordinary Hugging Face model: its forward knows nothing about balanced_losses.
CalibratedBalancer is a feature-level method, attached from the outside with
`weighting.attach(model, "bert")` ("bert" is the encoder submodule whose output the heads share).
For its first `--calibration-steps` training steps it balances the tasks' gradients at the
encoder's output, then fixes the multipliers it reached as loss weights. No heads are named: the
topic head reads `last_hidden_state[:, 0]`, not the encoder's output itself, so at the
weighting's call each task's gradient at the encoder's output is measured through its own head
(one extra backward pass through the heads, none through the encoder), and `loss.backward()`
sends the balanced sum into the encoder. The factor the Trainer applies to the total after
`compute_loss` (the gradient-accumulation divisor, the fp16 scaler's scale) reaches the encoder
as it reaches the heads.

Its checkpoint holds the training steps counted (`steps_done`), the gradient norms (`ema`,
`count`) and the frozen multipliers (`frozen_scale`): a run resumed during the calibration
continues it, one resumed after keeps its weights.

What to log: the Trainer's own `loss` is the weighting's total, which keeps the value of the
plain sum of the losses (the frozen multipliers act on the gradient only). `log` adds
`weighting.log_dict()` to the Trainer's training logs (every `logging_steps`): the raw losses,
their plain sum `loss/sum` (comparable with a plain-sum run), the weights and, while it
calibrates, each task's share of the gradient sent into the encoder.

    pip install -e ".[hf]"
    python examples/hf_trainer.py --output-dir /tmp/hf-run
    python examples/hf_trainer.py --smoke    # 4 steps (3 calibrating), resumed from step 2 (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import balanced_losses as bl

SMOKE = os.environ.get("BL_SMOKE", "") not in ("", "0")
TASKS = ("topic", "salience")
TOPICS = 4
SEQ = 16
WEIGHTING_FILE = "weighting.pt"


class TwoHeadBert(BertPreTrainedModel):
    """A BERT encoder, a 4-class head on the first token and a 1-output head on every token."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.topic_head = nn.Linear(config.hidden_size, TOPICS)
        self.salience_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        feats = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return {
            "topic": self.topic_head(feats[:, 0]),
            "salience": self.salience_head(feats).squeeze(-1),
        }


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
    )


class Synthetic(Dataset):
    """Token sequences; the topic is the most frequent token class (id mod 4), the per-token
    salience a large-valued function of the token id."""

    def __init__(self, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (size, SEQ), generator=gen)
        self.topic = (self.ids % TOPICS).mode(dim=1).values
        self.salience = 20.0 * (self.ids.float() / 64.0) ** 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.topic[i], "salience": self.salience[i]}


class MultiTaskTrainer(Trainer):
    """`Trainer` whose loss is a balanced_losses weighting of the per-task losses."""

    def __init__(self, *args: Any, weighting: bl.Weighting, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weighting = weighting.to(self.args.device)
        self.add_callback(SaveWeighting(self.weighting))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        **kwargs: Any,
    ) -> Any:
        # The model's mode (Trainer.evaluate switches it to eval): statistics frozen in eval.
        self.weighting.train(model.training)
        out = model(input_ids=inputs["input_ids"])
        losses = {
            "topic": F.cross_entropy(out["topic"], inputs["labels"]),
            "salience": F.mse_loss(out["salience"], inputs["salience"]),
        }
        total = self.weighting(losses)
        return (total, out) if return_outputs else total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the weighting's numbers to the Trainer's training logs (every `logging_steps`)."""
        if "loss" in logs:  # the training log; evaluation logs `eval_loss`
            # One host-device sync, on logging steps only; every reporter sees these keys.
            logs = {**logs, **self.weighting.log_dict()}
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Restore the weighting from the checkpoint (if resuming), then train."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / WEIGHTING_FILE
            state = torch.load(path, map_location=self.args.device, weights_only=True)
            self.weighting.load_state_dict(state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class SaveWeighting(TrainerCallback):
    """Writes the weighting's state_dict into every checkpoint folder the Trainer writes."""

    def __init__(self, weighting: bl.Weighting) -> None:
        self.weighting = weighting

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(self.weighting.state_dict(), folder / WEIGHTING_FILE)


def make_trainer(
    output_dir: str, max_steps: int, save_steps: int, calibration_steps: int = 100
) -> MultiTaskTrainer:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=save_steps,
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,  # the Trainer must pass "salience" through
        label_names=["labels", "salience"],  # evaluation then calls compute_loss
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    model = TwoHeadBert(tiny_config())
    weighting = bl.CalibratedBalancer(TASKS, steps=calibration_steps)
    # Hooks on the encoder; the model's forward is unchanged. No heads named: the topic head
    # takes a slice of the encoder's output, so each task's gradient there is measured.
    weighting.attach(model, "bert")
    return MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=Synthetic(256, seed=0),
        eval_dataset=Synthetic(32, seed=1),
        weighting=weighting,
    )


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, Tensor) else v == b[k] for k, v in a.items()
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--calibration-steps", type=int, default=100, help="CalibratedBalancer's `steps`"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 steps, 3 calibrating, resumed from step 2"
    )
    args = parser.parse_args(argv)
    smoke = args.smoke or SMOKE
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp
        if not smoke:
            trainer = make_trainer(out, args.steps, 50, args.calibration_steps)
            trainer.train()
            metrics: dict[str, float] = trainer.evaluate()
            weighting = trainer.weighting
            print(dict(zip(weighting.tasks, weighting.last_weights.tolist(), strict=True)), metrics)
            return metrics

        # Smoke: 4 steps in one go, then the same run resumed from its step-2 checkpoint. The
        # weights freeze after step 3: the resumed run finishes the calibration it was in.
        full = make_trainer(os.path.join(out, "full"), 4, 2, calibration_steps=3)
        full.train()
        at_2 = torch.load(Path(out, "full", "checkpoint-2", WEIGHTING_FILE), weights_only=True)
        # A new trainer (a fresh weighting) resumes from checkpoint-2 and runs steps 3 and 4.
        resumed = make_trainer(os.path.join(out, "full"), 4, 2, calibration_steps=3)
        restored: dict[str, Any] = {}

        class Check(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                state = resumed.weighting.state_dict()
                restored.update(
                    {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
                )

        resumed.add_callback(Check())
        resumed.train(resume_from_checkpoint=str(Path(out, "full", "checkpoint-2")))
        if not same_state(restored, at_2):
            raise RuntimeError("resuming did not restore the weighting's state of step 2")
        print(f"resume restored the weighting's state of step 2: {sorted(at_2)}")
        final_full = torch.load(
            Path(out, "full", "checkpoint-4", WEIGHTING_FILE), weights_only=True
        )
        match = same_state(resumed.weighting.state_dict(), final_full)
        print(f"resumed run ends in the uninterrupted run's weighting state: {match}")
        metrics = resumed.evaluate()
        print(f"eval loss {metrics['eval_loss']:.4f}")
        weighting = resumed.weighting
        frozen = dict(zip(weighting.tasks, weighting.frozen_weights.tolist(), strict=True))
        print(
            f"after {int(weighting.steps_done)} steps, calibrated over {weighting.steps}: "
            f"frozen {weighting.frozen}, multipliers {frozen}"
        )
        # The log history holds the step-2 logs of the run resumed from, then its own.
        for entry in resumed.state.log_history:
            if "loss/sum" in entry:
                logs = {k: round(v, 4) for k, v in entry.items() if "/" in k}
                print(f"weighting logs at step {entry['step']}: {logs}")
        return metrics


if __name__ == "__main__":
    main()

"""train_seg.py's training loop across phases (paper §3.4: pretrain -> finetune is two phases, each with a
fresh optimizer and schedule): batches (common/seg/batches.py's MixedBatches, §3.4) -> DataLoader -> normalise -> targets -> loss -> clip -> step,
with stats.jsonl, the periodic validation (common/seg/validation.py: --eval-every, Fig. 11), checkpoints and the
run's totals (what was drawn from each source, skipped images)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.runtime.checkpoint import save_seg_checkpoint
from common.runtime.cluster import Preempted, ignore_sigterm, preempted_message, stop_requested
from common.seg.hrnet import loss as hrnet_loss
from common.runtime.loader import as_tensors
from common.runtime.progress import console, progress_bar
from common.seg.data import collate, mask_target, semantic_labels
from common.seg.model import build_optimizer, is_hrnet, lr_factor
from common.seg.validation import Validator
from common.runtime.seeds import step_seed


class Loop:
    """The training loop's state across phases: what was drawn from each source, skipped images and steps
    (the run's totals, kept in every checkpoint), the stats.jsonl log."""

    def __init__(self, a, accelerator, net, processor, dataset, source_names, output_dir, phases, batches, weights=None, val=None):
        self.batches = batches  # the batch sampler class: common/seg/batches.py's MixedBatches (§3.4)
        self.a, self.accelerator, self.net, self.processor, self.dataset = a, accelerator, net, processor, dataset
        self.weights = weights  # synthetic draw probabilities (segdata.synthetic_weights), None: uniform
        self.source_names, self.output_dir, self.phases = source_names, output_dir, phases
        self.hrnet = is_hrnet(a.recipe.split("/")[1])
        # Per-process counts: samples drawn from each source, then images left out for having no label.
        self.counts = torch.zeros(len(source_names) + 1, dtype=torch.long)
        self.skipped_steps = 0  # the same on every process
        self.stats = open(output_dir / "stats.jsonl", "a") if accelerator.is_main_process else None
        dev = accelerator.device
        self.mean = torch.tensor(processor.image_mean, device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(processor.image_std, device=dev).view(1, 3, 1, 1) * 255
        # --eval-every N: the validation split (or --eval-samples of it) every N steps (Fig. 11)
        self.validator = Validator(a, accelerator, val, processor, output_dir) if getattr(a, "eval_every", 0) and val else None
        self.last = {"loss": None, "lr": getattr(a, "lr", None)}  # the last logged loss and lr, for the validation records

    def totals(self) -> dict:  # a collective: every process calls it
        c = self.accelerator.reduce(self.counts.to(self.accelerator.device), "sum").cpu().tolist()
        return {"drawn": dict(zip(self.source_names, c[:-1])), "skipped_images": c[-1], "skipped_steps": self.skipped_steps}

    def resume(self, path: Path | None, say) -> tuple[int, int]:
        """(phase, step) to start from; the run's totals so far from the checkpoint (counted once, on the main process)."""
        if path is None:
            if self.validator:  # a fresh start: what an earlier run in this folder measured goes
                self.validator.resume(0)
            return 0, 0
        state = json.loads((path / "state.json").read_text())
        if self.accelerator.is_main_process:
            self.counts = torch.tensor([state["drawn"].get(n, 0) for n in self.source_names] + [state["skipped_images"]], dtype=torch.long)
        self.skipped_steps = state["skipped_steps"]
        if self.validator:
            self.validator.resume(sum(s for _, _, s in self.phases[:state["phase"]]) + state["step"])
        say(f"resuming from {path} (phase {state['phase'] + 1}, step {state['step']})")
        return state["phase"], state["step"]

    def phase(self, k: int, first: int, resume_from: Path | None, say):
        """Phase k from step `first`: a fresh optimizer and schedule (pretrain -> finetune, §3.4). Returns the prepared model."""
        a, acc = self.a, self.accelerator
        name, p_aug, steps = self.phases[k]
        acc.free_memory()
        optimizer = build_optimizer(self.net, a.optimizer, a.lr, a.weight_decay, a.backbone_lr_multiplier, a.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=steps: lr_factor(s, n, **a.schedule))
        model, optimizer, scheduler = acc.prepare(self.net, optimizer, scheduler)
        if resume_from is not None:
            acc.load_state(str(resume_from))
        sampler = self.batches(len(self.dataset.sources[0]), [len(s) for s in self.dataset.sources[1:]], a.batch_size // acc.num_processes,
                               p_aug, a.seed + 1000 * k, first, steps, acc.process_index, acc.num_processes, self.weights)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=a.num_workers, collate_fn=collate,
                                             pin_memory=acc.device.type == "cuda", persistent_workers=False,
                                             worker_init_fn=ignore_sigterm if a.num_workers else None,
                                             prefetch_factor=4 if a.num_workers else None)
        say(f"phase {k + 1}/{len(self.phases)} [bold]{name}[/]: steps {first}..{steps}, p_aug {p_aug}, global batch {a.batch_size}, crop {a.crop}")
        model.train()
        t0, t_log, n_log, loss_sum = time.perf_counter(), time.perf_counter(), 0, 0.0
        with progress_bar(console, "it/s", enabled=acc.is_main_process, transient=True) as progress:
            bar = progress.add_task(name, total=steps, completed=first)
            for step, batch in enumerate(loader, start=first):
                # The loss draws from torch's global RNG (Mask2Former's uncertainty point sampling, dropout): seed it from
                # (seed, phase, step, rank), so a resumed run draws what the uninterrupted one drew at this step.
                torch.manual_seed(step_seed(a.seed + 1000 * k, step, acc.process_index))
                loss = self.step(model, optimizer, scheduler, batch)
                if loss is not None:
                    loss_sum, n_log = loss_sum + loss, n_log + 1
                done = step + 1
                progress.update(bar, completed=done)
                if done % a.log_every == 0 or done == steps:
                    self.log(name, done, loss_sum / max(n_log, 1), scheduler, (time.perf_counter() - t_log) / a.log_every
                             if done % a.log_every == 0 else None, sum(s for _, _, s in self.phases[:k]))
                    t_log, n_log, loss_sum = time.perf_counter(), 0, 0.0
                if self.validator and self.validator.due(done, steps):  # before the checkpoint: a kill here measures it again
                    self.validator.run(model, name, done, done + sum(s for _, _, s in self.phases[:k]), self.last["loss"], self.last["lr"])
                stop = done < steps and stop_requested(acc)  # SIGTERM: save this step's checkpoint and stop (common/runtime/cluster.py)
                if stop or a.checkpoint_every and (done % a.checkpoint_every == 0 or done == steps):
                    path = save_seg_checkpoint(acc, self.net, self.processor, self.output_dir, {"phase": k, "step": done, **self.totals()}, a.keep_checkpoints)
                    if stop:
                        raise Preempted(preempted_message(done, path))
        acc.wait_for_everyone()
        elapsed = time.perf_counter() - t0
        say(f"phase {name}: {steps - first} steps in {elapsed:.1f} s ({(steps - first) / max(elapsed, 1e-9):.2f} it/s)")
        return model

    def step(self, model, optimizer, scheduler, batch):
        """One iteration on a segdata.collate batch: normalise, the targets on the device (Mask2Former's masks
        from the label map and the segment ids the DataLoader workers found, or HRNet's per-pixel classes),
        loss, clip, step. Returns the loss (None: skipped)."""
        acc, a = self.accelerator, self.a
        batch = as_tensors(batch)  # segdata.collate sent the small tensors by value
        keep = batch["keep"]  # (B,) bool on the host: images with any labelled pixel (the others must not reach the loss)
        self.counts[:-1] += torch.bincount(batch["source"], minlength=len(self.source_names))
        self.counts[-1] += int((~keep).sum())
        # Every process takes the same branch (the loss itself synchronises its mask count).
        if bool(acc.gather(keep.any()[None].long().to(acc.device)).min() == 0):
            self.skipped_steps += 1
            scheduler.step()
            return None
        rows = keep.nonzero()[:, 0].to(acc.device)  # the kept images, indexed after the copy (which then reads the pinned batch)
        images = (batch["image"].to(acc.device, non_blocking=True)[rows].float() - self.mean) / self.std
        labels = batch["label"].to(acc.device, non_blocking=True)  # (B, H, W) int32
        if self.hrnet:  # per-pixel cross-entropy, 255 (ignore, padding) left out
            loss = hrnet_loss(model(images), semantic_labels(labels[rows]))
        else:
            valid = batch["valid"].to(acc.device, non_blocking=True)[rows].long()
            ids = batch["segments"].to(acc.device, non_blocking=True).split(batch["counts"])  # per image (N_i,), found in the workers
            targets = [mask_target(lab, i) for lab, i, k in zip(labels, ids, keep.tolist()) if k]  # (N_i, H, W) bool, (N_i,)
            mask_labels, class_labels = [m.float() for m, _ in targets], [c for _, c in targets]
            loss = model(pixel_values=images, pixel_mask=valid, mask_labels=mask_labels, class_labels=class_labels).loss
        acc.backward(loss)
        if a.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), a.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    def log(self, phase: str, done: int, loss, scheduler, seconds_per_it, offset: int) -> None:
        loss = self.accelerator.reduce(torch.as_tensor(loss, device=self.accelerator.device), "mean")
        rec = {"phase": phase, "step": done, "loss": float(loss), "lr": max(scheduler.get_last_lr()),  # head lr
               "it_per_s": 1 / seconds_per_it if seconds_per_it else None, **self.totals()}
        self.last = {"loss": rec["loss"], "lr": rec["lr"]}
        if self.stats:
            self.stats.write(json.dumps(rec) + "\n")
            self.stats.flush()
        self.accelerator.log({"loss": rec["loss"], "lr": rec["lr"]}, step=done + offset)

    def close(self) -> None:
        if self.stats:
            self.stats.close()

"""Progress bar over the whole run: loss, λ, images/s and ETA (tqdm, rank 0 only)."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                        dynamic_ncols=True, smoothing=0.1)
        self._rate = None  # images/s, exponentially smoothed

    def update(self, metrics: dict, images: int, seconds: float, epoch: int) -> None:
        rate = images / max(seconds, 1e-9)
        self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
        postfix = {"ep": epoch, "loss": f"{metrics['loss']:.3f}", "img/s": f"{self._rate:.0f}"}
        for key in ("lam_mixmask", "lam_unmix"):
            if key in metrics:
                postfix[key.replace("lam_", "λ_")] = f"{metrics[key]:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

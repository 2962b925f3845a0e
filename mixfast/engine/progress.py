"""Progress bar over the whole run: loss, λ, images/s and ETA (tqdm, rank 0 only)."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                        dynamic_ncols=True, smoothing=0.1)
        self._rate = None  # images/s, exponentially smoothed over the logging windows
        self._images, self._seconds = 0, 0.0

    def update(self, metrics: dict | None, images: int, seconds: float, epoch: int) -> None:
        """One step done. `metrics` (loss, λ) only on the steps whose values were read from the
        device (the logging steps); the bar keeps showing the last ones in between. The images/s
        comes from the seconds between updates, so on a GPU it evens out over the host syncs."""
        self._images += images
        self._seconds += seconds
        if metrics is not None:
            rate = self._images / max(self._seconds, 1e-9)
            self._images, self._seconds = 0, 0.0
            self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
            postfix = {"ep": epoch, "loss": f"{metrics['loss']:.3f}", "img/s": f"{self._rate:.0f}"}
            for key in ("lam_mixmask", "lam_unmix"):
                if key in metrics:
                    postfix[key.replace("lam_", "λ_")] = f"{metrics[key]:.2f}"
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

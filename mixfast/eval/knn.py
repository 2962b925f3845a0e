"""kNN monitor: weighted k-nearest-neighbour top-1 accuracy, InstDisc style (Wu et al., 2018),
as in MoCo's official CIFAR-10 demo (k = 200, t = 0.1 by default).

Features are L2-normalized; the memory bank is the training split under the test
transform; class score = Σ over the top-k neighbours of exp(sim / t). With several ranks
each extracts features of its shard and the shards are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixfast.engine import distributed as dist_utils


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device, channels_last: bool = False):
    feats, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(F.normalize(encoder(x).float(), dim=1))
        labels.append(y.to(device))
    if not feats:  # every image of this shard unreadable
        raise RuntimeError("no image of the split could be read (all were skipped as unreadable)")
    return torch.cat(feats), torch.cat(labels)


def knn_predict(test_feats, bank_feats, bank_labels, num_classes: int, k: int, t: float, chunk: int = 1024):
    """Top-1 predicted class per test row; chunked so the similarity matrix stays small."""
    k = min(k, bank_feats.size(0))
    preds = []
    for start in range(0, test_feats.size(0), chunk):
        sim = test_feats[start:start + chunk] @ bank_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.size(0), num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def _gather_uneven(t: torch.Tensor) -> torch.Tensor:
    """all-gather tensors whose first dimension differs across ranks (pad, gather, trim)."""
    if dist_utils.world_size() == 1:
        return t
    n = torch.tensor([t.size(0)], device=t.device)
    sizes = dist_utils.all_gather_cat(n).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.size(0)] = t
    gathered = dist_utils.all_gather_cat(padded).split(max(sizes))
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)])


@torch.no_grad()
def knn_accuracy(encoder: nn.Module, bank_loader, test_loader, num_classes: int, k: int = 200, t: float = 0.1,
                 device="cpu", channels_last: bool = False) -> float:
    """Top-1 accuracy in percent. Loaders yield this rank's shard of (images, labels)."""
    was_training = encoder.training
    encoder.eval()
    try:
        bank_f, bank_y = extract_features(encoder, bank_loader, device, channels_last)
        test_f, test_y = extract_features(encoder, test_loader, device, channels_last)
    finally:
        encoder.train(was_training)
    bank_f, bank_y = _gather_uneven(bank_f), _gather_uneven(bank_y)
    correct = (knn_predict(test_f, bank_f, bank_y, num_classes, k, t) == test_y).sum().float()
    total = torch.tensor(float(test_y.numel()), device=correct.device)
    correct, total = dist_utils.all_reduce_sum(correct), dist_utils.all_reduce_sum(total)
    return float(100.0 * correct / total.clamp(min=1.0))


# --- command line: python -m mixfast.eval.knn RUN_OR_CKPT [--k K --t T] ---------------------------


def main(argv=None) -> dict:
    """kNN accuracy of a run's backbone (default k and t: the run's eval.knn_k / eval.knn_t)."""
    import argparse
    import os
    import time

    from tqdm.auto import tqdm

    from mixfast.data import build_eval_loader
    from mixfast.engine.logging import info
    from mixfast.eval import common

    parser = argparse.ArgumentParser(prog="python -m mixfast.eval.knn", description=main.__doc__)
    common.add_common_args(parser)
    parser.add_argument("--k", type=int, default=None, help="neighbours (default: the run's eval.knn_k)")
    parser.add_argument("--t", type=float, default=None, help="temperature (default: the run's eval.knn_t)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    source, cfg, backbone, device = common.setup(args)
    k = cfg.eval.knn_k if args.k is None else args.k
    t = cfg.eval.knn_t if args.t is None else args.t
    if k < 1 or t <= 0:
        parser.error("--k must be >= 1 and --t > 0")
    out = args.out or common.default_out(source, "knn")
    os.makedirs(out, exist_ok=True)
    data = common.labelled_data(cfg, out)
    transform = common.val_transform(data.recipe, data.image_size)
    wrap = lambda loader, desc: tqdm(loader, desc=desc, disable=args.no_progress, leave=False)  # noqa: E731
    bank = build_eval_loader(common.EvalDataset(data.train, transform), args.batch_size, cfg.data.num_workers)
    test = build_eval_loader(common.EvalDataset(data.test, transform), args.batch_size, cfg.data.num_workers)
    info(f"kNN (k {k}, t {t}) of {source.weights} on {cfg.data.name}: bank {len(data.train)} / test "
         f"{len(data.test)} images -> {out}")
    top1 = knn_accuracy(backbone, wrap(bank, "bank"), wrap(test, "test"), data.num_classes, k, t, device)
    images = {"train": common.image_counts(data.train, bank.unreadable),
              "test": common.image_counts(data.test, test.unreadable)}
    info(f"images: bank {common.counts_text(images['train'])}; test {common.counts_text(images['test'])}")
    metrics = {**common.base_record("knn", source, cfg, data, images), "protocol": "knn (InstDisc)", "top1": top1,
               "hyperparameters": {"k": k, "t": t, "features": "backbone"}, "wall_s": time.perf_counter() - t_start}
    common.EpochLog(out, "knn").log(0, {"top1": top1, "k": k, "t": t, "images": images})
    path = common.write_json(os.path.join(out, "knn_metrics.json"), metrics)
    info(f"wrote {path}")
    print(f"kNN top-1: {top1:.2f}%", flush=True)
    return metrics


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

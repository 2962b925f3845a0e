"""configs/ and the README table are generated from mixfast.recipes and must match it."""

from pathlib import Path

from mixfast.config import load_config
from mixfast.recipes import README_BEGIN, README_END, all_recipes, readme_table, render

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_file_is_up_to_date():
    stale = [r.name for r in all_recipes() if (REPO / "configs" / f"{r.name}.json").read_text() != render(r)]
    assert stale == [], f"regenerate with `python -m mixfast.recipes --write configs/`: {stale}"


def test_every_config_file_comes_from_a_recipe():
    names = {r.name for r in all_recipes()}
    extra = [p.name for p in (REPO / "configs").glob("*.json") if p.stem not in names]
    assert extra == []


def test_table8_grid_is_complete():
    names = {r.name for r in all_recipes()}
    for data in ("cifar100", "tinyimagenet"):
        for fw in ("moco", "simclr", "byol", "simsiam"):
            for variant in ("", "_mixmask", "_unmix", "_mixmask_unmix"):
                assert f"{data}_{fw}{variant}" in names


def test_table8_values():
    simclr = load_config(REPO / "configs/tinyimagenet_simclr_mixmask.json", ["data.name=synthetic"])
    assert (simclr.optim.name, simclr.optim.lr, simclr.model.feature_dim, simclr.model.head_hidden_dim) == ("adam", 0.002, 128, 1024)
    assert simclr.mixing.mixmask.grid == 4 and not simclr.mixing.unmix.enabled
    byol = load_config(REPO / "configs/cifar100_byol_unmix.json", ["data.name=synthetic"])
    assert (byol.optim.lr, byol.model.feature_dim, byol.method.momentum, byol.method.momentum_schedule) == (0.003, 64, 0.99, "cosine")
    assert byol.mixing.unmix.prob_mixup == 0.5 and not byol.mixing.mixmask.enabled
    simsiam = load_config(REPO / "configs/cifar100_simsiam.json", ["data.name=synthetic"])
    assert (simsiam.optim.name, simsiam.optim.lr, simsiam.optim.warmup_epochs) == ("sgd", 0.03, 10.0)
    mixsiam = load_config(REPO / "configs/in1k_mixsiam.json", ["data.name=synthetic"])
    assert (mixsiam.method.name, mixsiam.model.head_layers, mixsiam.model.predictor_hidden_dim) == ("mixsiam", 3, 512)
    assert (mixsiam.optim.lr, mixsiam.train.batch_size) == (0.025, 128)


def test_readme_table_is_current():
    text = (REPO / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == readme_table().strip(), "regenerate with `python -m mixfast.recipes --readme README.md`"

"""Multi-source episodes (data.source: multi) and Meta-Dataset's variable-way variable-shot sampler (data.sampler:
meta_dataset): the sampler's rules over many draws, source frequencies against the weights, purity in (seed, split,
step, slot), one-line spec errors, ProtoNets over variable ways, and a short `metascale run` on a two-source mix."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metascale.algorithms.protonet import prototype_logits
from metascale.config import MetaDatasetSampler, MultiData, ShardsData
from metascale.data import build_task_source, check_episodes
from metascale.data.multi import pick_sources
from metascale.data.pack import SourceClass, pack
from metascale.data.tasks import TaskList
from metascale.errors import DataError, SpecError

SPLIT_OF = ("train", "train", "val", "test")
COUNTS = (4, 7, 12, 30)  # class c holds COUNTS[(c // 4) % 4] examples: the sampler's rules depend on class sizes
FIXED = {"ways": 3, "shots": 1, "queries": 2}  # fixed-shape episodes the smallest classes can make


def _classes(tag: int, n: int, size: int = 10, seed: int = 0) -> list[SourceClass]:
    """Pixel (0, 0) is the set's tag, (0, 1) the class, (0, 2) the example: every image says where it came from."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n):
        k = COUNTS[(c // 4) % 4]
        imgs = rng.integers(0, 256, (k, size, size), dtype=np.uint8)
        imgs[:, 0, 0], imgs[:, 0, 1], imgs[:, 0, 2] = tag, c, np.arange(k)
        out.append(SourceClass(f"k{c}", f"a{c}", SPLIT_OF[c % 4], list(imgs)))
    return out


def _per_sample_set(root, tag: int, n: int) -> None:
    """The same kind of classes as per-sample WebDataset shards (KEY.png + KEY.cls), as other tools write them."""
    import webdataset as wds

    root.mkdir()
    for split in ("train", "val", "test"):
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=50, verbose=0) as w:
            for c, cls in enumerate(_classes(tag, n, seed=tag)):
                if cls.split == split:
                    for i, img in enumerate(cls.images):
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="PNG")
                        w.write({"__key__": f"{c:03d}_{i:03d}", "png": buf.getvalue(), "cls": str(c).encode()})


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multi")
    pack(_classes(1, 64), root / "a", progress=False, max_classes_per_shard=16)
    pack(_classes(2, 48, seed=1), root / "b", progress=False, max_classes_per_shard=16)
    pack(_classes(3, 16, size=12), root / "big", progress=False)
    _per_sample_set(root / "c", 4, 32)
    return {k: str(root / k) for k in ("a", "b", "big", "c")}


def _mix(sets, weights=(3, 1), names=("a", "b"), **kw) -> MultiData:
    layout = {"c": "samples"}  # set c is per-sample shards
    return MultiData(
        sources=[{"url": sets[n], "weight": w, "layout": layout.get(n, "classes")} for n, w in zip(names, weights)],
        **kw,
    )


def _where(t) -> list[tuple[int, int, int, int]]:
    """(set tag, class, example, label) of every support then query image of a float [0, 1] task."""
    x = torch.cat([t.support_x, t.query_x])[:, 0, 0, :3].mul(255).round().long()
    return [(*row.tolist(), int(y)) for row, y in zip(x, torch.cat([t.support_y, t.query_y]))]


def test_meta_dataset_episodes_follow_the_samplers_rules(sets):
    s = MetaDatasetSampler(min_ways=3, max_ways=12, max_queries=5, max_support=40, max_support_per_class=9)
    src = build_task_source(ShardsData(url=sets["a"], sampler=s), "train", seed=0)
    tasks = src.batch(0, range(300)).tasks()
    ways_seen, support_sizes = set(), []
    for t in tasks:
        ways = int(t.query_y.max()) + 1
        ways_seen.add(ways)
        assert 3 <= ways <= 12 and t.support_y.tolist() == sorted(t.support_y.tolist())  # class-major
        rows = _where(t)
        assert len(set(r[:3] for r in rows)) == len(rows)  # no example twice, support and query disjoint
        counts, shots, queries = [], [], []
        for label in range(ways):
            mine = [r for r in rows if r[3] == label]
            assert len({r[1] for r in mine}) == 1 and {r[0] for r in mine} == {1}  # one class of set a
            counts.append(COUNTS[(mine[0][1] // 4) % 4])
            shots.append(int((t.support_y == label).sum()))
            queries.append(int((t.query_y == label).sum()))
        assert len(set(queries)) == 1 and queries[0] == min(5, min(counts) // 2)
        assert all(1 <= k <= n - queries[0] for k, n in zip(shots, counts))
        assert ways <= sum(shots) <= min(40, sum(min(9, n - queries[0]) for n in counts))
        support_sizes.append(sum(shots))
    assert ways_seen == set(range(3, 13))  # 32 train classes: every way count in [3, 12] drawn in 300 episodes
    # the cap binds (the floors lose under one example per class), and small supports occur
    assert 40 - 12 < max(support_sizes) <= 40 and min(support_sizes) < 12


def test_the_default_sampler_is_fixed_and_unchanged(sets):
    spec = ShardsData(url=sets["a"], ways=4, shots=1, queries=3)
    assert spec.sampler.name == "fixed" and not spec.variable
    b = build_task_source(spec, "train", 0).batch(5, range(3))
    assert b.support_x.shape == (3, 4, 1, 10, 10) and b.query_x.shape == (3, 12, 1, 10, 10)


def test_source_frequencies_match_the_weights():
    weights, n = (3.0, 1.0, 1.0), 20000
    picks = np.bincount(pick_sources(weights, 7, "train", 11, range(n)), minlength=3) / n
    p = np.array(weights) / sum(weights)
    assert np.all(np.abs(picks - p) < 5 * np.sqrt(p * (1 - p) / n))  # 5 standard errors; fixed seed: no flake
    assert pick_sources(weights, 7, "train", 11, [5]) == pick_sources(weights, 7, "train", 11, range(6))[5:]


def test_episodes_come_from_the_picked_set_in_weight_proportion(sets):
    spec = _mix(sets, **FIXED)
    tasks = build_task_source(spec, "train", 3).batch(2, range(400)).tasks()
    tags = [_where(t)[0][0] for t in tasks]
    assert all({r[0] for r in _where(t)} == {tag} for t, tag in zip(tasks, tags))  # one set per episode
    assert [{1: 0, 2: 1}[tag] for tag in tags] == pick_sources((3, 1), 3, "train", 2, range(400))
    share = tags.count(1) / 400
    assert abs(share - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 400)


@pytest.mark.parametrize("sampler", ["fixed", "meta_dataset"])
def test_mixed_layouts_are_pure_in_seed_split_step_slot(sets, sampler):
    """Per-class and per-sample shards in one mix, with augmentation: any grouping of slots, a pickled (worker) copy
    and a fresh reader give the same bytes; another seed, split or step does not."""
    kw = {"sampler": sampler, "augment": ["crop", "flip"]} | ({} if sampler == "meta_dataset" else FIXED)
    spec = _mix(sets, weights=(1, 1), names=("a", "c"), **kw)
    src = build_task_source(spec, "train", 0)
    whole = src.batch(4, range(8)).tasks()
    again = pickle.loads(pickle.dumps(build_task_source(spec, "train", 0)))
    singles = [again.batch(4, [slot])[0] for slot in reversed(range(8))][::-1]
    assert set(pick_sources((1, 1), 0, "train", 4, range(8))) == {0, 1}  # both sets used (crops hide the tags)
    for a, b in zip(whole, singles):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))
    for other in (
        build_task_source(spec, "train", 1).batch(4, [0])[0],
        src.batch(5, [0])[0],
        build_task_source(spec, "val", 0).batch(4, [0])[0],
    ):
        assert other.support_x.shape != whole[0].support_x.shape or not torch.equal(other.support_x, whole[0].support_x)
    assert isinstance(src.batch(0, [0]), TaskList) == (sampler == "meta_dataset")


def test_sets_of_different_image_shapes_are_refused(sets, make_job, tmp_path):
    spec = _mix(sets, names=("a", "big"), **FIXED)
    with pytest.raises(DataError, match=r"holds 1x12x12 \(CxHxW\) images, .* 1x10x10 .*re-pack") as e:
        build_task_source(spec, "train", 0).batch(0, [0])
    assert "\n" not in str(e.value)
    job = make_job(tmp_path, data=spec.model_dump(), algorithm={"name": "protonet"})
    with pytest.raises(DataError, match="a mix needs one image shape"):
        check_episodes(job)


def test_a_source_serving_only_some_splits(sets, make_job, tmp_path):
    data = {"source": "multi", **FIXED, "sources": [{"url": sets["a"]}, {"url": sets["b"], "serves": ["test"]}]}
    src = build_task_source(MultiData(**data), "train", 0)
    assert {_where(t)[0][0] for t in src.batch(0, range(40)).tasks()} == {1}
    assert {_where(t)[0][0] for t in build_task_source(MultiData(**data), "test", 0).batch(0, range(40)).tasks()} == {
        1,
        2,
    }
    check_episodes(make_job(tmp_path, data=data, algorithm={"name": "protonet"}))
    data["sources"][0]["serves"] = ["test"]
    with pytest.raises(SpecError, match="no source serves split .train."):
        make_job(tmp_path, data=data, algorithm={"name": "protonet"})


def _validate(cli, tmp_path, data, **job):
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "m",
                "model": {"name": "conv4", "hidden": 8},
                "data": data,
                "algorithm": {"name": "protonet"},
                **job,
            }
        )
    )
    return cli("validate", str(path))


@pytest.mark.parametrize(
    "data, job, expected",
    [
        (
            {"sampler": "meta_dataset"},
            {"algorithm": {"name": "maml"}},
            "data.sampler 'meta_dataset' draws a different number of ways per episode; algorithm.name 'maml'",
        ),
        ({"sampler": "meta_dataset"}, {"algorithm": {"name": "anil"}}, "algorithm.name 'anil' adapts a fixed"),
        (
            {"sampler": "meta_dataset"},
            {"executor": {"strategy": "vmap"}},
            "executor.strategy 'vmap' stacks equal-shaped",
        ),
        ({"sampler": "meta_dataset", "ways": 10}, {}, "ways: set by sampler 'fixed' only"),
        (
            {"sampler": {"name": "meta_dataset", "min_ways": 8, "max_ways": 6}},
            {},
            "min_ways (8) must be <= max_ways (6)",
        ),
        ({"sampler": {"name": "meta_dataset", "max_support": 20}}, {}, "max_support (20) must be >= max_ways (50)"),
        ({"sampler": "variable"}, {}, "sampler"),
        ({"sources": [{"url": "x"}]}, {}, "sources"),
        (
            {"sources": [{"url": "x"}, {"url": "y", "layout": "samples", "on_bad_sample": "skip"}]},
            {},
            "sources[1]: on_bad_sample 'skip': only for layout 'classes'",
        ),
        ({"sources": [{"url": "x", "weight": 0}, {"url": "y"}]}, {}, "weight"),
    ],
)
def test_spec_errors_are_one_line(cli, tmp_path, data, job, expected):
    data = {"source": "multi", "sources": [{"url": "x"}, {"url": "y"}]} | data
    code, _, err = _validate(cli, tmp_path, data, **job)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) <= 2  # the message, and at most a header line naming the file


def test_a_sampler_on_synthetic_or_streamed_data_is_refused(cli, tmp_path):
    code, _, err = _validate(cli, tmp_path, {"source": "synthetic", "sampler": "meta_dataset"})
    assert code == 2 and "synthetic images have none" in err
    code, _, err = _validate(
        cli,
        tmp_path,
        {"source": "glyphs", "sampler": "meta_dataset", "stream": {"window_shards": 2, "window_steps": 5}},
    )
    assert code == 2 and "reads the whole split (no stream)" in err


def test_protonet_logits_over_a_wider_head_equal_the_exact_width(float64):
    """A 4-way episode read by a 9-wide ProtoNet: same loss and gradient as with ways=4, absent classes -inf."""
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(10, 6, generator=g, requires_grad=True), torch.randn(8, 6, generator=g)
    sy, qy = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    losses, grads = [], []
    for ways in (4, 9):
        logits = prototype_logits(support, sy, query, ways)
        loss = torch.nn.functional.cross_entropy(logits, qy)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, support)[0])
    assert torch.isinf(logits[:, 4:]).all() and torch.isfinite(grads[1]).all()
    assert torch.allclose(losses[0], losses[1], atol=1e-12) and torch.allclose(grads[0], grads[1], atol=1e-12)


def test_the_vmap_strategy_runs_variable_episodes_per_task(sets, make_job, tmp_path):
    from metascale.algorithms import build_algorithm
    from metascale.algorithms.executor import meta_gradient
    from metascale.data import output_dim
    from metascale.models import build_model

    job = make_job(
        tmp_path,
        data=_mix(sets, sampler="meta_dataset").model_dump(),
        algorithm={"name": "protonet"},
        model={"name": "conv4", "hidden": 8, "image_size": 10},
    )
    model = build_model(job.model, output_dim(job.data)).double()
    alg = build_algorithm(job.algorithm, model)
    batch = build_task_source(job.data, "train", 0).batch(0, range(3)).to("cpu", torch.float64)
    params = alg.init(dict(model.named_parameters()))
    a, b = (meta_gradient(alg, params, batch, s) for s in ("vmap", "per_task"))
    assert a.strategy == "per_task" and a.tasks == 3 and not a.nonfinite_slots
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)


def test_protonet_trains_on_a_two_source_mix_through_metascale_run(sets, make_job, tmp_path, cli):
    from metascale.cluster import checkpoint

    data = _mix(sets, names=("a", "c"), sampler={"name": "meta_dataset", "max_ways": 8}).model_dump(mode="json")
    spec = make_job(
        tmp_path,
        data=data,
        algorithm={"name": "protonet"},
        model={"name": "conv4", "hidden": 8, "image_size": 10},
        outer={"meta_batch": 4, "steps": 3},
        eval={"every": 3, "episodes": 4, "final_episodes": 4, "split": "test"},
        cluster={"address": "inline", "workers": 1},
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    code, out, err = cli("run", str(job))
    assert code == 0, err
    step, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    assert step == 3 and all(torch.isfinite(v).all() for v in state["params"].values())
    assert state["params"]["head.weight"].shape[0] == 8  # the head is max_ways wide (ProtoNets reads its width)

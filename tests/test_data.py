"""The data pipeline of ``nnx_trainer.data``: global batches split across processes,
per-example and batch transforms, multi-epoch and resumed pipelines, padded and masked
evaluation batches, and the device prefetcher."""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest

from nnx_trainer.transforms import BatchTransform, uniform


def test_pipeline_slices_processes_into_the_same_global_batches():
    from nnx_trainer.data import PipelineConfig, train_pipeline

    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(37)])
    single = list(train_pipeline(examples, (), PipelineConfig(8), seed=3, epoch=1))
    shards = [
        list(train_pipeline(examples, (), PipelineConfig(8, p, 2), seed=3, epoch=1))
        for p in range(2)
    ]
    assert len(single) == 4 and all(len(s) == 4 for s in shards)
    for b, whole in enumerate(single):
        joined = np.concatenate([shards[0][b]["x"], shards[1][b]["x"]])
        assert sorted(joined.tolist()) == sorted(whole["x"].tolist())
    epoch2 = list(train_pipeline(examples, (), PipelineConfig(8), seed=3, epoch=2))
    assert not np.array_equal(epoch2[0]["x"], single[0]["x"])  # reshuffled per epoch


class _KeyNoise(BatchTransform):
    """Adds a per-example random draw: shows which key each example got."""

    def map_batch(self, batch, keys):
        return {**batch, "noise": uniform(keys, 0)}


def test_batch_transform_draws_do_not_depend_on_the_process_split():
    from nnx_trainer.data import PipelineConfig, train_pipeline

    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(40)])
    single = list(train_pipeline(examples, [_KeyNoise()], PipelineConfig(8), seed=3, epoch=1))
    shards = [
        list(train_pipeline(examples, [_KeyNoise()], PipelineConfig(8, p, 2), seed=3, epoch=1))
        for p in range(2)
    ]
    for b, whole in enumerate(single):
        by_example = dict(zip(whole["x"].tolist(), whole["noise"].tolist(), strict=True))
        for shard in shards:
            for x, noise in zip(shard[b]["x"].tolist(), shard[b]["noise"].tolist(), strict=True):
                assert by_example[x] == noise  # same example, same draw, any process
    epoch2 = list(train_pipeline(examples, [_KeyNoise()], PipelineConfig(8), seed=3, epoch=2))
    assert set(epoch2[0]["noise"].tolist()).isdisjoint(single[0]["noise"].tolist())


def test_a_multi_epoch_pipeline_is_the_per_epoch_pipelines_joined():
    from nnx_trainer.data import PipelineConfig, train_pipeline

    def double(element):
        return {**element, "x": element["x"] * 2}

    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(20)])
    transforms = [double, _KeyNoise()]

    def batches(**kwargs):
        return [(b["x"].tolist(), b["noise"].tolist())
                for b in train_pipeline(examples, transforms, PipelineConfig(6), seed=1,
                                        **kwargs)]

    joined = [b for e in (2, 3, 4) for b in batches(epoch=e)]
    assert batches(epoch=2, num_epochs=3) == joined  # 3 batches per epoch, remainder dropped
    assert batches(epoch=2, num_epochs=3, start_batch=4) == joined[4:]  # a mid-epoch resume


def test_per_example_transforms_run_before_batch_transforms():
    from nnx_trainer.data import PipelineConfig, split_transforms, train_pipeline

    def double(element):
        return {**element, "x": element["x"] * 2}

    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(16)])
    batches = list(train_pipeline(examples, [double, _KeyNoise()], PipelineConfig(4),
                                  seed=0, epoch=0))
    assert sorted(np.concatenate([b["x"] for b in batches]).tolist()) == list(range(0, 32, 2))
    assert all(b["noise"].shape == (4,) for b in batches)
    with pytest.raises(ValueError, match="list every per-example transform first"):
        split_transforms([_KeyNoise(), double])


def test_eval_pipeline_pads_masks_and_applies_batch_transforms():
    from nnx_trainer.data import MASK_KEY, PipelineConfig, eval_pipeline

    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(10)])
    iterator, num_batches = eval_pipeline(examples, [_KeyNoise()], PipelineConfig(4))
    batches = list(iterator)
    assert num_batches == len(batches) == 3
    xs = np.concatenate([b["x"] for b in batches])
    mask = np.concatenate([b[MASK_KEY] for b in batches])
    assert xs[mask].tolist() == list(range(10)) and not mask[10:].any()
    assert xs[~mask].tolist() == [9, 9]  # padding repeats the last example
    assert all(b["noise"].shape == (4,) for b in batches)


def test_prefetch_keeps_batches_on_device_ahead_of_the_step():
    from nnx_trainer.data import DevicePrefetcher

    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((2,), i)}

    prefetcher = DevicePrefetcher(source(), jax.device_put, size=2)
    batch, _ = next(prefetcher)
    assert int(batch["x"][0]) == 0 and pulled == [0, 1]  # batch 1 already on device
    prefetcher.refill()  # what the trainer does right after dispatching the step
    assert pulled == [0, 1, 2]
    assert isinstance(next(prefetcher)[0]["x"], jax.Array)
    prefetcher.close()


def test_the_padding_mask_leaves_an_examples_own_mask_alone_and_refuses_its_own_key():
    # Was "mask": a text model's own "mask" was replaced by the padding mask in evaluation.
    from nnx_trainer.data import MASK_KEY, PipelineConfig, eval_pipeline

    examples = grain.MapDataset.source([{"mask": np.ones(3, bool)} for _ in range(5)])
    batches = list(eval_pipeline(examples, (), PipelineConfig(4))[0])
    assert [b["mask"].shape for b in batches] == [(4, 3), (4, 3)]
    assert np.concatenate([b[MASK_KEY] for b in batches]).tolist() == [True] * 5 + [False] * 3
    clash = grain.MapDataset.source([{MASK_KEY: np.ones(3, bool)}])
    with pytest.raises(ValueError, match=f"hold a key '{MASK_KEY}'.*rename that key"):
        list(eval_pipeline(clash, (), PipelineConfig(4))[0])

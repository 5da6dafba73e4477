"""Bad data is refused, not learned: labels outside the model's classes, empty datasets."""

from __future__ import annotations

import grain
import numpy as np
import pytest
from tiny_task import TinyTask, make_examples, make_trainer

import nnx_trainer.transforms
from resnet_task.data import DataError
from resnet_task.task import ResNetTask

# The synthetic dataset: no files, no download; 4 classes.
TINY = dict(
    dataset="synthetic", image_size=8, model="simple",
    model_kwargs=(("num_blocks", 1), ("initial_features", 4)),
    dataset_kwargs=(("num_examples", 64), ("num_classes", 4)),
)


def _relabelled(examples: grain.MapDataset, label: int, every: int) -> grain.MapDataset:
    """``examples`` with every ``every``-th label replaced by ``label``, from a plain list
    (a source of the user's own, as a subclass would return)."""
    rows = [dict(examples[i]) for i in range(len(examples))]
    for i in range(0, len(rows), every):
        rows[i]["label"] = np.int32(label)
    return grain.MapDataset.source(rows)


class OutOfRangeTrainLabels(ResNetTask):
    """A subclass whose own training source has labels past the last class."""

    def train_data(self) -> grain.MapDataset:
        return _relabelled(super().train_data(), label=7, every=5)


class NegativeValLabels(ResNetTask):
    """A subclass whose own validation source has a negative label."""

    def val_data(self) -> grain.MapDataset:
        return _relabelled(super().val_data(), label=-1, every=3)


SHORT_FIT = {"max_steps": 3, "log_every_n_steps": 1}


@pytest.mark.parametrize("worker_count", [0, 2], ids=["in-process", "grain-workers"])
def test_a_subclass_source_with_out_of_range_labels_fails_naming_label_range_and_source(
        tmp_path, worker_count):
    with pytest.raises(DataError) as caught:
        trainer = make_trainer(tmp_path / "run", worker_count=worker_count, **SHORT_FIT)
        trainer.fit(OutOfRangeTrainLabels(**TINY))
    message = str(caught.value)
    assert "label 7" in message and "[0, 4)" in message
    assert "OutOfRangeTrainLabels.train_data()" in message


def test_an_out_of_range_validation_label_fails_the_evaluation(tmp_path):
    task = NegativeValLabels(**TINY)
    with pytest.raises(DataError, match=r"label -1, outside the valid range \[0, 4\)"):
        make_trainer(tmp_path / "run", **SHORT_FIT).validate(task, untrained=True)


def test_labels_in_range_train_as_before(tmp_path):
    trainer = make_trainer(tmp_path / "run", **SHORT_FIT)
    trainer.fit(ResNetTask(**TINY))
    assert trainer.global_step == 3 and "val/accuracy" in trainer.callback_metrics


class EmptyTrain(TinyTask):
    def train_data(self):
        return make_examples(0)


class EmptyVal(TinyTask):
    def val_data(self):
        return grain.MapDataset.source([])


class EmptyNamedVal(TinyTask):
    def val_data(self):
        return {"clean": make_examples(8, seed=1), "noisy": grain.MapDataset.source([])}


class EmptyTest(TinyTask):
    def test_data(self):
        return grain.MapDataset.source([])


class EmptyPredict(TinyTask):
    def predict_data(self):
        return grain.MapDataset.source([])


def test_an_empty_train_data_is_named_not_taken_for_a_batch_size_problem(tmp_path):
    with pytest.raises(ValueError) as caught:
        make_trainer(tmp_path / "run", **SHORT_FIT).fit(EmptyTrain())
    message = str(caught.value)
    assert "EmptyTrain.train_data() returned no examples" in message
    assert "batch size" not in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_empty_val_data_fails_the_fit_before_its_first_step(tmp_path):
    trainer = make_trainer(tmp_path / "run", plugin_autoload=None, **SHORT_FIT)
    with pytest.raises(ValueError, match=r"EmptyVal\.val_data\(\) returned no examples"):
        trainer.fit(EmptyVal())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"EmptyNamedVal\.val_data\(\)\['noisy'\] has no"):
        make_trainer(tmp_path / "run", **SHORT_FIT).fit(EmptyNamedVal())


def test_empty_test_and_predict_data_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"EmptyTest\.test_data\(\) returned no examples"):
        make_trainer(tmp_path / "run", **SHORT_FIT).test(EmptyTest(), untrained=True)
    with pytest.raises(ValueError, match=r"EmptyPredict\.predict_data\(\) returned no examples"):
        make_trainer(tmp_path / "run", **SHORT_FIT).predict(EmptyPredict(), untrained=True)


class _Examples(TinyTask):
    """TinyTask over examples edited by ``edit(list of example dicts)``."""

    def __init__(self, edit, transforms=()) -> None:
        super().__init__(n_val=0)
        self.edit, self.transforms = edit, tuple(transforms)

    def train_data(self):
        examples = make_examples(self.n_train, dim=self.dim)
        return grain.MapDataset.source(self.edit([dict(examples[i]) for i in range(self.n_train)]))

    def train_transforms(self):
        return self.transforms


def _ragged(rows):
    rows[5]["image"] = rows[5]["image"][:7]
    return rows


def _missing_label(rows):
    del rows[3]["label"]
    return rows


def _with_names(rows):
    return [{**row, "name": f"example {i}"} for i, row in enumerate(rows)]


class _NamesToLengths(nnx_trainer.transforms.BatchTransform):
    """A batch transform that reads strings (a tokenizer would): the batch it returns
    has numbers only, so the strings never reach the step."""

    def map_batch(self, batch, keys):
        lengths = np.array([len(s) for s in batch.pop("name")], np.int32)
        return {**batch, "length": lengths}


def _two_views(rows):
    """A list of two arrays per example (two views), one shorter than the other."""
    return [{**row, "views": [row["image"], row["image"][:5]]} for row in rows]


@pytest.mark.parametrize(("edit", "message"), [
    (_two_views, r"sequences that are not one array under \['views'\] \(items of different "
                 r"shapes\)"),
    (_ragged, r"the examples of a batch differ in shape under \['image'\]: \(7,\), \(8,\); "
              r"every example needs the same shapes"),
    (lambda rows: [(r["image"], r["label"]) for r in rows],
     r"examples must be dicts of arrays .* got tuple"),
    (_missing_label, r"the examples of a batch have different keys: \[.*\] and \[.*\]; "
                     r"every example needs the same keys"),
    (_with_names, r"the examples hold <U10 values under 'name', which a compiled step "
                  r"cannot take; drop that key"),
])
def test_examples_a_batch_cannot_hold_are_named(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, max_steps=4).fit(_Examples(edit))  # one epoch: every row


def test_strings_that_a_batch_transform_consumes_are_fine(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(_Examples(_with_names, transforms=[_NamesToLengths()]))
    assert trainer.global_step == 2


def test_a_list_of_numbers_is_an_array_not_one_leaf_per_position(tmp_path):
    # Was: {"image": [0.1, ...]} became a list of 8 arrays of shape (16,), which the step
    # turned into a transposed (8, 16) array: the model saw features as examples, no error.
    def as_lists(rows):
        return [{**row, "image": row["image"].tolist()} for row in rows]

    arrays = make_trainer(tmp_path / "arrays", max_steps=4, log_every_n_steps=1)
    arrays.fit(_Examples(lambda rows: rows))
    lists = make_trainer(tmp_path / "lists", max_steps=4, log_every_n_steps=1)
    lists.fit(_Examples(as_lists))
    assert float(lists.callback_metrics["train/loss"]) == pytest.approx(
        float(arrays.callback_metrics["train/loss"]), rel=1e-6)


def test_a_predict_step_without_a_row_per_example_is_named(tmp_path):
    # Was NumPy's "zero-dimensional arrays cannot be concatenated", naming nothing.
    class MeanPredict(TinyTask):
        def predict_step(self, model, batch):
            return {"logits": model(batch["image"]), "mean": model(batch["image"]).mean()}

    trainer = make_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"MeanPredict.predict_step must return a row per "
                                         r"example .* batch's 16\); \['mean'\] has shape \(\)"):
        trainer.predict(MeanPredict(), untrained=True)

"""autohdr.training.config overrides, autohdr.runs.presets, autohdr.diagnosis.checksum, autohdr.training.checkpoint."""

import os

import pytest
import torch

from autohdr.training import checkpoint
from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.training.config import TrainConfig, apply_overrides
from autohdr.runs.presets import MODES, load_preset
from autohdr.training.trainer import cosine_lr_factor


class TestOverrides:
    def test_types_are_coerced(self):
        cfg = apply_overrides(TrainConfig(), ["lr=1e-4", "epochs=3", "debug_instrumentation=true",
                                              "max_steps_per_epoch=none", "loss_weights.pixel=2"])
        assert (cfg.lr, cfg.epochs, cfg.debug_instrumentation, cfg.max_steps_per_epoch) == (1e-4, 3, True, None)
        assert cfg.loss_weights.pixel == 2.0

    def test_unknown_key_is_refused(self):
        with pytest.raises(ValueError, match="unknown config key 'lrr'"):
            apply_overrides(TrainConfig(), ["lrr=1"])

    @pytest.mark.parametrize("item,match", [("epochs=two", "expected int"), ("amp=maybe", "true/false"),
                                            ("lr", "key=value"), ("stage=stage9", "unknown stage")])
    def test_bad_values_are_refused(self, item, match):
        with pytest.raises(ValueError, match=match):
            apply_overrides(TrainConfig(), [item])


class TestPresets:
    @pytest.mark.parametrize("mode", MODES)
    def test_each_mode_loads(self, mode):
        preset = load_preset(mode)
        assert preset.mode == mode
        assert preset.train.debug_instrumentation and preset.train.debug_perf_enabled
        assert 32 <= preset.data.num_pairs <= 64 and preset.data.overfit

    def test_bare_keys_mean_train(self):
        preset = load_preset("stage2_probe", ["epochs=2", "data.num_pairs=40", "judge.beats_identity_margin=0.01"])
        assert (preset.train.epochs, preset.data.num_pairs, preset.judge.beats_identity_margin) == (2, 40, 0.01)

    def test_unknown_mode_and_key(self, tmp_path):
        with pytest.raises(ValueError, match="unknown debug mode 'stage4'"):
            load_preset("stage4")
        bad = tmp_path / "bad.toml"
        bad.write_text("[train]\nlearning_rate = 1\n")
        with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
            load_preset(bad)


    @pytest.mark.parametrize("toml,fragments", [
        ('[train]\nlr = "abc"\n', ["train.lr", "expected float", "'abc'"]),
        ('[data]\nnum_pairs = "x"\n', ["data.num_pairs", "expected int", "'x'"]),
        ("[data]\nresize_hw = 128\n", ["data.resize_hw", "expected tuple[int, int]", "128"]),
        ("[data]\nresize_hw = [96, 64, 3]\n", ["data.resize_hw", "[96, 64, 3]"]),
        ("[model]\nwidths = [16, 32.5]\n", ["model.widths", "expected int"]),
        ("data = 3\n", ["data", "expected a table", "3"]),
        ("[train]\namp = 1\n", ["train.amp", "expected bool", "1"]),
    ], ids=["text-for-float", "text-for-int", "number-for-pair", "triple-for-pair", "float-in-int-list",
            "value-for-table", "int-for-bool"])
    def test_wrongly_typed_preset_values_are_refused_by_name(self, tmp_path, toml, fragments):
        bad = tmp_path / "bad.toml"
        bad.write_text(toml)
        with pytest.raises(ValueError) as caught:
            load_preset(bad)
        for fragment in fragments:
            assert fragment in str(caught.value)

    def test_typed_values_are_converted(self, tmp_path):
        good = tmp_path / "good.toml"
        good.write_text("[train]\nlr = 1\n[data]\nresize_hw = [96, 64]\n[model]\nwidths = [8, 16, 32, 48]\n")
        preset = load_preset(good)
        assert preset.train.lr == 1.0 and isinstance(preset.train.lr, float)
        assert preset.data.resize_hw == (96, 64) and preset.model.widths == (8, 16, 32, 48)

    def test_top_level_keys_are_not_overridable(self):
        with pytest.raises(ValueError, match="unknown config key 'train.mode'"):
            load_preset("stage2_probe", ["mode=relabelled"])


class TestSchedule:
    def test_cosine_endpoints_and_warmup(self):
        assert cosine_lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
        assert cosine_lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
        assert cosine_lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
        assert cosine_lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
        assert cosine_lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)


class TestChecksum:
    def test_same_values_same_checksum(self):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert tensor_checksum(x) == tensor_checksum(x.clone())
        assert len(tensor_checksum(x)) == 16

    def test_kernel_noise_rarely_registers(self):
        # Float32 kernel noise (a few ulp, ~1e-7 per pixel) only changes the digest when a pooled
        # cell sits within the noise of a rounding boundary. The documented bound on the chance
        # of that is cells * 2 * sigma_pooled / quantum; a raw-bit hash would flip every time.
        generator = torch.Generator().manual_seed(0)
        trials, flips, sigma = 100, 0, 1e-7
        for _ in range(trials):
            x = torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64)
            noisy = x + torch.randn(x.shape, generator=generator, dtype=torch.float64) * sigma
            flips += tensor_checksum(x) != tensor_checksum(noisy)
        cells, pixels_per_cell, quantum = 2 * 3 * 8 * 8, 16, 1e-4
        bound = cells * 2 * (sigma / pixels_per_cell ** 0.5) / quantum
        assert flips / trials <= bound
        assert bound < 0.2

    def test_same_values_same_digest_across_dtypes(self):
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        assert tensor_checksum(x) == tensor_checksum(x.clone()) == tensor_checksum(x.double())

    def test_real_change_registers(self):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = x.clone()
        y[0, :, :8, :8] += 0.01
        assert tensor_checksum(x) != tensor_checksum(y)

    def test_negative_decimals_refused(self):
        with pytest.raises(ValueError, match="decimals"):
            tensor_checksum(torch.zeros(2), decimals=-1)


class TestCheckpoint:
    def test_round_trip_weights_only(self, tmp_path):
        payload = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "config": {"lr": 1e-3}}
        path = checkpoint.save_atomic(payload, tmp_path / "last.pt")
        loaded = torch.load(path, weights_only=True)
        assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))
        assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind

    def test_crash_mid_write_keeps_the_old_file(self, tmp_path, monkeypatch):
        path = checkpoint.save_atomic({"model": {}, "epoch": 1}, tmp_path / "last.pt")

        def exploding_save(obj, handle):
            handle.write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", exploding_save)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.save_atomic({"model": {}, "epoch": 2}, path)
        monkeypatch.undo()
        assert checkpoint.load_checkpoint(path)["epoch"] == 1
        assert sorted(os.listdir(tmp_path)) == ["last.pt"]

    def test_bad_files_give_clear_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            checkpoint.load_checkpoint(tmp_path / "nope.pt")
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match="could not be read"):
            checkpoint.load_checkpoint(garbage)

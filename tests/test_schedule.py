"""Schedules: the papers' timelines, purity, rescaling, serialisation, the CLI printout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lnfree.method.schedule import Schedule, all_site_names, control_schedule
from lnfree.recipes import PRESETS, get_recipe, recipe_schedule


def _freeze_steps(schedule, kind):
    return [at for site, at in schedule.freeze_at.items() if site.endswith(kind)]


def test_heimersheim2024_on_gpt2_small():
    s = recipe_schedule(get_recipe("heimersheim2024", 12), 12)
    assert _freeze_steps(s, ".ln2") == list(range(200, 421, 20))  # ln2 from step 200, 20 apart
    assert _freeze_steps(s, ".ln1.qk") == list(range(440, 661, 20))
    assert _freeze_steps(s, ".ln1.v") == list(range(680, 1011, 30))  # start = 440 + 12 × 20
    assert s.freeze_at["ln_final"] == 1040  # 680 + 12 × 30
    assert (s.eot_off, s.bos_off, s.total_steps) == (1060, 1160, 1200)


def test_baroni2025_on_gpt2_small_and_sizes():
    s = recipe_schedule(get_recipe("baroni2025", 12), 12)
    assert _freeze_steps(s, ".ln2") == list(range(20, 43, 2))
    assert _freeze_steps(s, ".ln1.qk") == list(range(44, 67, 2))
    assert _freeze_steps(s, ".ln1.v") == list(range(68, 102, 3))
    assert (s.freeze_at["ln_final"], s.eot_off, s.bos_off, s.total_steps) == (104, 106, 116, 300)
    assert get_recipe("baroni2025", 12).train.aux_weight == 0.1
    # per-size settings picked by depth (Baroni et al. 2025, Table: steps; large uses lr 3e-4, gaps 4/4/6)
    for n_layer, steps in ((24, 500), (36, 600), (48, 800)):
        assert recipe_schedule(get_recipe("baroni2025", n_layer), n_layer).total_steps == steps
    large = recipe_schedule(get_recipe("baroni2025", 36), 36)
    assert _freeze_steps(large, ".ln2")[:3] == [20, 24, 28]
    assert get_recipe("baroni2025", 36).train.lr == 3e-4


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("n_layer", [1, 5, 48])
def test_every_preset_covers_every_site_in_order(name, n_layer):
    s = recipe_schedule(get_recipe(name, n_layer), n_layer)
    assert sorted(s.freeze_at) == sorted(all_site_names(n_layer))
    steps = [e[0] for e in s.events()]
    assert steps == sorted(steps) and steps[-1] < s.total_steps
    assert not s.is_complete_at(s.bos_off - 1) or s.bos_off == 0
    assert s.is_complete_at(s.total_steps - 1)


def test_state_is_a_pure_function_of_step():
    s = recipe_schedule(get_recipe("baroni2025", 4), 4)
    assert s.state_at(50) == s.state_at(50)
    before, at = s.state_at(19), s.state_at(20)
    assert not before["blocks.0.ln2"].frozen and at["blocks.0.ln2"].frozen
    assert not at["blocks.1.ln2"].frozen
    assert at["blocks.0.ln2"].bos_weight == 1.0 and s.state_at(s.bos_off)["ln_final"].bos_weight == 0.0


def test_bos_special_can_be_eased_out():
    s = Schedule(total_steps=20, freeze_at={"ln_final": 0}, eot_off=5, bos_off=10, bos_ramp=4)
    weights = [s.state_at(t)["ln_final"].bos_weight for t in range(5, 12)]
    assert weights == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_rescale_keeps_order_and_proportion():
    s = recipe_schedule(get_recipe("baroni2025", 12), 12, steps=150)
    assert s.total_steps == 150 and s.rescaled_from == 300
    assert s.freeze_at["blocks.0.ln2"] == 10 and s.bos_off == round(116 / 2)
    assert "rescaled from the preset's 300 steps" in s.format_timeline()


def test_json_round_trip():
    s = recipe_schedule(get_recipe("heimersheim2024", 3), 3, steps=77)
    again = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.state_at(40) == s.state_at(40)


def test_control_freezes_nothing():
    assert control_schedule(10).state_at(5) == {}


def test_too_short_run_is_refused():
    from lnfree.method.schedule import build_schedule
    with pytest.raises(ValueError, match="too short"):
        build_schedule(get_recipe("baroni2025", 12).removal, 12, total_steps=50)


def test_cli_prints_timeline_and_rejects_unknown_preset():
    run = lambda *a: subprocess.run([sys.executable, "-m", "lnfree.cli", "schedule", *a],
                                    capture_output=True, text=True)
    ok = run("--preset", "heimersheim2024", "--layers", "48")
    assert ok.returncode == 0
    assert "blocks.47.ln1.v" in ok.stdout and "bos special" in ok.stdout
    bad = run("--preset", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "known: heimersheim2024" in bad.stderr

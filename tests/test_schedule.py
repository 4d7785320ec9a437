"""Schedules: phase order at every depth, state against a direct reading, specials per site, rescaling, JSON,
the CLI printout. The papers' exact steps are held in test_presets.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from lnfree.method.schedule import SITE_KINDS, RemovalSpec, Schedule, build_schedule, control_schedule, standard_layout
from lnfree.run.recipes import PRESETS, get_recipe, recipe_schedule

PHASES = [*SITE_KINDS, "eot", "bos"]  # ln2 → ln1.qk → ln1.v → ln_final → EOT specials → position-0 specials


def site_kind(name: str) -> str:
    return {s.name: s.kind for s in standard_layout(48)}[name]


def _phase_steps(s: Schedule) -> dict[str, list[int]]:
    out = {p: [] for p in PHASES}
    for site, at in s.freeze_at.items():
        out[site_kind(site)].append(at)
    out["eot"] = list(s.eot_off.values())
    out["bos"] = list(s.bos_off.values())
    return out


def _layer_of(site: str) -> int:
    return int(site.split(".")[1]) if site.startswith("blocks.") else -1


@pytest.mark.parametrize("name", [*PRESETS, "per-site specials"])
@pytest.mark.parametrize("n_layer", [1, 5, 48])
def test_phases_in_order_at_every_depth(name, n_layer):
    if name == "per-site specials":
        spec = RemovalSpec(start=3, gaps={"ln2": 2, "ln1qk": 1, "ln1v": 3}, eot_after=2, bos_after=4, tail=5,
                           eot_kinds=SITE_KINDS, bos_kinds=("ln2", "ln1v"), special_span=5)
        s = build_schedule(spec, standard_layout(n_layer))
    else:
        s = recipe_schedule(get_recipe(name, n_layer), n_layer)
    assert sorted(s.freeze_at) == sorted(site.name for site in standard_layout(n_layer))
    steps = _phase_steps(s)
    lagged = name != "per-site specials" and get_recipe(name, n_layer).removal.bos_lag is not None
    if lagged:  # each site's special goes a fixed lag after its own freeze, while later sites still freeze
        lag = get_recipe(name, n_layer).removal.bos_lag
        scaled = s.rescaled_from is not None
        assert all(off > s.freeze_at[site] and (scaled or off == s.freeze_at[site] + lag)
                   for site, off in s.bos_off.items())
        steps["bos"] = []
    present = [p for p in PHASES if steps[p]]
    for before, after in zip(present, present[1:], strict=False):  # every step of a phase ≤ every step of the next one
        assert max(steps[before]) <= min(steps[after]), (before, after)
    for kind in ("ln2", "ln1qk", "ln1v"):  # within a phase, block i before block i + 1
        by_layer = sorted((_layer_of(site), at) for site, at in s.freeze_at.items() if site_kind(site) == kind)
        assert [at for _, at in by_layer] == sorted(at for _, at in by_layer)
    for offs in (s.eot_off, s.bos_off):  # specials leave in removal order
        assert list(offs.values()) == sorted(offs.values())
        assert all(offs[site] > s.freeze_at[site] for site in offs) or s.freeze_at["ln_final"] == 0
    assert s.last_event < s.total_steps and s.is_complete_at(s.total_steps - 1)
    if s.last_event > 0:
        assert not s.is_complete_at(s.last_event - 1)


def _direct_state(s: Schedule, site: str, step: int) -> tuple[bool, float, float]:
    """What the schedule means, read straight from its fields."""
    def weight(off, ramp):
        if off is None:
            return 0.0
        if step >= off:
            return 0.0
        return 1.0 if step < off - ramp else (off - step) / ramp
    return (step >= s.freeze_at[site], weight(s.bos_off.get(site), s.bos_ramp),
            weight(s.eot_off.get(site), s.eot_ramp))


def test_state_at_every_step_matches_a_direct_reading():
    spec = RemovalSpec(start=2, gaps={"ln2": 1, "ln1qk": 2, "ln1v": 1}, eot_after=1, bos_after=2, tail=3,
                       eot_kinds=("ln1v", "ln_final"), bos_kinds=SITE_KINDS, special_span=7, eot_ramp=2,
                       bos_ramp=3)
    s = build_schedule(spec, standard_layout(3))
    again = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    for step in range(s.total_steps + 2):
        state = again.state_at(step)
        assert set(state) == set(s.freeze_at)
        for site, st in state.items():
            assert (st.frozen, st.bos_weight, st.eot_weight) == pytest.approx(_direct_state(s, site, step)), \
                (site, step)


def test_sites_without_a_special_never_use_one():
    s = recipe_schedule(get_recipe("heimersheim2024", 2), 2)
    frozen = s.state_at(s.freeze_at["ln_final"])
    assert frozen["blocks.0.ln1.v"].eot_weight == 1.0  # the 2024 code's EOT special: ln_1's V path only
    assert frozen["blocks.0.ln1.qk"].eot_weight == 0.0 and frozen["blocks.0.ln2"].eot_weight == 0.0
    assert all(st.bos_weight == 0.0 for st in frozen.values())


def test_bos_special_can_be_eased_out():
    s = Schedule(total_steps=20, freeze_at={"ln_final": 0}, eot_off={"ln_final": 5}, bos_off={"ln_final": 10},
                 bos_ramp=4)
    weights = [s.state_at(t)["ln_final"].bos_weight for t in range(5, 12)]
    assert weights == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    # power 2 (lnfree-uniform): (steps left / ramp)², and it survives the JSON a run records
    s = Schedule.from_dict(json.loads(json.dumps(replace(s, bos_power=2.0).to_dict())))
    weights = [s.state_at(t)["ln_final"].bos_weight for t in range(5, 12)]
    assert weights == [1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    assert "weight (steps left / 4) ** 2" in s.format_timeline()


def test_rescale_keeps_order_and_proportion():
    s = recipe_schedule(get_recipe("heimersheim2024", 12), 12, steps=600)
    assert s.total_steps == 600 and s.rescaled_from == 1200
    assert s.freeze_at["blocks.0.ln2"] == 100 and s.eot_off["blocks.3.ln1.v"] == 530
    assert "rescaled from the preset's 1200 steps" in s.format_timeline()


def test_json_round_trip():
    s = recipe_schedule(get_recipe("heimersheim2024", 3), 3, steps=777)
    again = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s


def test_control_freezes_nothing():
    assert control_schedule(10).state_at(5) == {}


def test_too_short_run_is_refused():
    with pytest.raises(ValueError, match="too short"):
        build_schedule(get_recipe("baroni2025", 12).removal, standard_layout(12), total_steps=50)


def test_cli_prints_timeline_and_rejects_unknown_preset():
    run = lambda *a: subprocess.run([sys.executable, "-m", "lnfree.cli", "schedule", *a],
                                    capture_output=True, text=True)
    ok = run("--preset", "heimersheim2024", "--layers", "48")
    assert ok.returncode == 0
    assert "blocks.47.ln1.v" in ok.stdout and "eot special σ̂ removed (48 sites)" in ok.stdout
    bad = run("--preset", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "known: heimersheim2024" in bad.stderr


def test_specials_spread_evenly_over_their_span():
    spec = RemovalSpec(start=0, gaps={"ln2": 1, "ln1qk": 1, "ln1v": 1}, eot_after=1, bos_after=0, tail=2,
                       eot_kinds=("ln2",), special_span=6)
    s = build_schedule(spec, standard_layout(4))
    last_freeze = s.freeze_at["ln_final"]
    offs = [s.eot_off[f"blocks.{i}.ln2"] - last_freeze - 1 for i in range(4)]
    assert offs == [0, 1, 3, 4]  # 4 sites over 6 steps, in removal order


@pytest.mark.parametrize("preset,layers,steps", [("baroni2025", 48, 3), ("lnfree", 36, 4), ("heimersheim2024", 2, 1)])
def test_a_run_too_short_for_its_events_is_refused_with_the_fewest_steps_that_fit(preset, layers, steps, capsys):
    """Rescaled so short that the last events land at the run's end, the model could not fold: refused before step
    0 (`lnfree schedule` and `remove` share removal_plan), naming the fewest steps that keep every event inside."""
    import re

    from lnfree.cli import main

    recipe = get_recipe(preset, layers)
    with pytest.raises(ValueError, match=f"--steps {steps} is too short") as refused:
        recipe_schedule(recipe, layers, steps)
    least = int(re.search(r"give --steps (\d+) or more", str(refused.value)).group(1))
    fits = recipe_schedule(recipe, layers, least)
    assert fits.last_event < least and fits.is_complete_at(least - 1)
    with pytest.raises(ValueError, match="too short"):
        recipe_schedule(recipe, layers, least - 1)
    assert main(["schedule", "--preset", preset, "--layers", str(layers), "--steps", str(steps)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"give --steps {least} or more" in err, err


def test_a_lagged_special_goes_a_fixed_time_after_its_own_freeze():
    spec = RemovalSpec(start=2, gaps={"ln2": 1, "ln1qk": 1, "ln1v": 2}, eot_after=0, bos_after=0, tail=4,
                       bos_kinds=("ln2", "ln1v"), bos_ramp=3, bos_lag=5)
    s = build_schedule(spec, standard_layout(3))
    assert s.bos_off == {site: at + 5 for site, at in s.freeze_at.items() if site_kind(site) in ("ln2", "ln1v")}
    site = "blocks.0.ln2"  # frozen at its special's full weight, eased out over the 3 steps before it goes
    weights = [s.state_at(s.freeze_at[site] + k)[site].bos_weight for k in range(7)]
    assert weights[:3] == [1.0, 1.0, 1.0] and 0 < weights[3] < 1 and weights[5:] == [0.0, 0.0]

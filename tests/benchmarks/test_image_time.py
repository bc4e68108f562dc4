"""benchmarks/image_time at toy size: one prompt, AR and SJD on the bundled demo model."""

import json

from benchmarks import image_time


def test_image_time_reports_ratios_to_ar(tmp_path):
    out = tmp_path / "t.json"
    res = image_time.main(
        ["--prompts", "1", "--rounds", "1", "--configs", "ar", "sjd W=16 coupled", "--threads", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == res
    ar, sjd = res["configs"]["ar"], res["configs"]["sjd W=16 coupled"]
    assert ar["vs_ar"] == 1.0 and ar["passes_mean"] == res["tokens"]  # AR: one pass per token
    assert 0 < sjd["passes_mean"] < ar["passes_mean"] and sjd["cpu_s_per_image"] > 0
    assert sjd["vs_ar"] == sjd["cpu_s_per_image"] / ar["cpu_s_per_image"]

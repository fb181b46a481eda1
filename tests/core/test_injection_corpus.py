"""The injection heuristic measured on a public corpus (a regression guard, not a claim).

Detection is a SIGNAL, not the defence. The firewall's heuristic raises the session's risk and
labels it ``injection_suspected`` so that policy can act; what actually stops a hijacked agent is
the narrow execution identity, argument constraints, argument provenance and human approval.
Expect paraphrases, other languages and new encodings to get through.

The corpus is the one shipped in the PyPI package ``bastioncorpus`` (0.6.0: 118 attacks and 63
benign "false-positive traps" that look like attacks, in five languages). The heuristic's phrase
list was written with this corpus in view, so these rates are in-sample and optimistic; on
unseen attacks expect a lower detection rate. The thresholds below were set from the measured
rates with a small margin, so that a change that makes the detector noisier or blinder fails
here first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import bastioncorpus  # type: ignore[import-untyped]  # the corpus ships no type hints

from agentic_iam.core.firewall import Firewall, ScreenConfig

# Measured with bastioncorpus 0.6.0: detection 112/118 = 94.9%, false positives 0/63 = 0.0%.
MIN_TRUE_POSITIVE_RATE = 0.92
MAX_FALSE_POSITIVE_RATE = 0.03  # one false positive in 63 passes (1.6%), two do not (3.2%)

CANARY = "c4n4ry-7f3a9"


def test_heuristic_on_the_public_injection_corpus(
        record_property: Callable[[str, object], None]) -> None:
    """Detection is a signal, not the defence: this guards its noise and blindness rates."""
    rows = bastioncorpus.load_corpus()
    firewall = Firewall()
    config = ScreenConfig()
    attacks = [r for r in rows if r.is_malicious]
    benign = [r for r in rows if not r.is_malicious]
    assert attacks and benign

    def flagged(text: str) -> bool:
        result = firewall.screen(text, config, untrusted=True)
        assert not result.blocked
        return any(f.kind.startswith("injection.") for f in result.findings)

    missed = [r for r in attacks if not flagged(r.render(CANARY))]
    false_positives = [r for r in benign if flagged(r.render(CANARY))]
    tp_rate = 1 - len(missed) / len(attacks)
    fp_rate = len(false_positives) / len(benign)

    by_category = Counter(r.category for r in attacks)
    missed_by_category = Counter(r.category for r in missed)
    print(f"\nbastioncorpus {bastioncorpus.__version__}: {len(attacks)} attacks, "
          f"{len(benign)} benign")
    print(f"true-positive rate  {tp_rate:6.1%}  ({len(attacks) - len(missed)}/{len(attacks)})")
    print(f"false-positive rate {fp_rate:6.1%}  ({len(false_positives)}/{len(benign)})")
    for category in sorted(by_category):
        total = by_category[category]
        print(f"  {category:22} {total - missed_by_category[category]:3}/{total}")
    print("missed:", ", ".join(f"{r.id} ({r.category}, {r.lang})" for r in missed) or "none")
    print("false positives:", ", ".join(r.id for r in false_positives) or "none")

    record_property("corpus_version", bastioncorpus.__version__)
    record_property("true_positive_rate", round(tp_rate, 4))
    record_property("false_positive_rate", round(fp_rate, 4))
    record_property("missed", ",".join(r.id for r in missed))
    record_property("false_positives", ",".join(r.id for r in false_positives))

    assert fp_rate <= MAX_FALSE_POSITIVE_RATE, [r.id for r in false_positives]
    assert tp_rate >= MIN_TRUE_POSITIVE_RATE, [r.id for r in missed]

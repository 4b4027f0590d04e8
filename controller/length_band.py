"""Length bands: requests of one (model, SLO class) whose prompts are of about the same
length, grouped together and with an output-length distribution learned of their own.

Output length follows the kind of request, and the prompt's length tells kinds apart. On
the Azure conversation trace prompts of 700-1,400 tokens produce ~370 output tokens
(median 400), the rest ~100; a (model, class) learner predicts ~210 for every request
(`qlm bench --scenario ls2`). Past capacity the planner drops the groups it expects to
cost most first, and with bands it can tell which those are: on ls2 at the FCFS-50% load
QLM met 86.1% with bands of half an octave against 79.4% without. On three models (mm3 at
1.72) they cost it 65.3 -> 57.7%, for a reason not yet found: the policy default is off.

A band is half-open in log2 of the prompt: with `per_octave` = 2, band 19 holds prompts
of 2^9 to 2^9.5 tokens (512-724). Band 0 stands for the class as a whole: every request
has it when banding is off (`grouping.length_bands_per_octave: 0`), and a band with no
finished request yet reads the class's figure (LengthLearner.length_stats).

Pure and shared: the controller stores a request's band with it at submission (the token
script files its finished length under it), and the simulator computes it the same way.
"""

from __future__ import annotations

import math

CLASS_WIDE = 0  # the band that stands for the whole (model, class)

# (model, SLO class, band): what output lengths are learned and read by
LengthKey = tuple[str, str, int]


def length_band(prompt_tokens: int, per_octave: int, latency_sensitive: bool = False) -> int:
    """The band of a prompt of this many tokens; CLASS_WIDE when banding is off, and for
    latency-sensitive requests: they are served at once whatever they will produce, and
    bands would only split their groups (more groups for the planner's budget)."""
    if per_octave <= 0 or latency_sensitive:
        return CLASS_WIDE
    return 1 + int(math.floor(math.log2(max(1, prompt_tokens)) * per_octave))

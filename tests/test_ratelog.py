"""imageio.ratelog: what clients cause is logged at a bounded rate and
cannot forge a line."""

import logging

from imageio import ratelog


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_once_per_interval_then_counts_left_out(caplog):
    clock = Clock()
    log = ratelog.RateLimitedLog(logging.getLogger("t"), interval=10,
                                 clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        for i in range(50):
            log.info("k", "refused %d", i)
        log.warning("other", "another kind")
        clock.now += 11
        log.info("k", "refused again")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0", "another kind",
                        "refused again (49 more since the last report)"]
    assert [r.levelno for r in caplog.records] == \
        [logging.INFO, logging.WARNING, logging.INFO]


def test_printable_escapes_control_characters():
    assert ratelog.printable("/images/abc") == "/images/abc"
    assert ratelog.printable("/x\n2026 INFO forged") == \
        "/x\\x0a2026 INFO forged"
    assert ratelog.printable("a\rb\x00c\u2028") == "a\\x0db\\x00c\\u2028"
    # Printable non-ASCII stays readable.
    assert ratelog.printable("/café") == "/café"

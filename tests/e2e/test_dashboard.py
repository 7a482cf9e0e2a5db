"""The dashboard in headless Chromium (Debian's `chromium`) against a running
federation: the page is loaded with the token in its URL fragment, runs its
JavaScript for a few seconds of virtual time (polling /api/* every 2 s), and
the DOM it built is checked against the store:

- one participants bar per committed round, each as high as the round's
  participants, and one "offered" bar per round;
- one accuracy and one loss point per evaluated round, with the reported values;
- a heatmap cell per trainer and round, coloured by that client's status;
- the current round's progress card and the refresh counter (live polling).

A screenshot goes to BUILD/dashboard.png (docs/dashboard.png is a copy of one).
Without /usr/bin/chromium (or $COHORT_CHROMIUM) the test skips with exit 77.

Chromium is driven through its own command line (--dump-dom, --screenshot,
--virtual-time-budget), so nothing beyond the Debian package is needed."""
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

sys.path.insert(0, os.path.dirname(__file__))
from cohort_e2e import Check  # noqa
from test_http import TOKEN, Federation, close  # noqa

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium():
    env = os.environ.get("COHORT_CHROMIUM")
    for c in [env] if env else [shutil.which("chromium"), "/usr/bin/chromium"]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class Elements(HTMLParser):
    """Collects the attributes of every element, by tag."""

    def __init__(self):
        super().__init__()
        self.els = []

    def handle_starttag(self, tag, attrs):
        self.els.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def find(self, tag=None, cls=None):
        return [a for t, a in self.els if (tag is None or t == tag) and
                (cls is None or cls in (a.get("class") or "").split())]


def chromium(binary, url, profile, extra, budget_ms=5000):
    args = [binary] + CHROME_FLAGS + ["--user-data-dir=" + profile,
                                      "--virtual-time-budget=%d" % budget_ms] + extra + [url]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def main():
    binary = find_chromium()
    if not binary:
        print("SKIP: chromium is not installed (apt-get install chromium, or set "
              "COHORT_CHROMIUM); the dashboard test needs a headless browser")
        sys.exit(77)
    t = Check("e2e-dashboard")
    build = os.path.abspath(os.environ.get("COHORT_BUILD", "build"))
    fed = Federation("dashboard", ntrainers=5, rounds_wanted=8, local_steps=30)
    profile = tempfile.mkdtemp(prefix="cohort-chromium-")
    try:
        fed.start()
        st = fed.run_until_still()
        url = "http://127.0.0.1:%d/#token=%s" % (fed.http_port, TOKEN)
        r = chromium(binary, url, profile, ["--dump-dom"])
        t.ok(r.returncode == 0 and b"</html>" in r.stdout,
             "chromium --dump-dom loaded the dashboard (%d; %s)"
             % (r.returncode, r.stderr.decode(errors="replace")[-300:] if r.returncode else ""))
        dom = Elements()
        dom.feed(r.stdout.decode(errors="replace"))

        db = fed.env.db()
        rounds = db.execute("SELECT round, offered, participants FROM rounds WHERE round > 0 "
                            "ORDER BY round").fetchall()
        body = dom.find("body")[0] if dom.find("body") else {}
        t.ok(int(body.get("data-updates", "0")) >= 2,
             "the page refreshed itself from /api/* (%s times in 5 s)" % body.get("data-updates"))
        t.ok(body.get("data-last-committed") == str(st["last_committed"]),
             "the page shows the last committed round %s" % st["last_committed"])

        bars = dom.find("rect", "bar")
        t.ok(len(bars) == len(rounds) and len(rounds) >= 8,
             "one participants bar per committed round (%d bars, %d rounds)"
             % (len(bars), len(rounds)))
        t.ok([(int(b["data-round"]), int(b["data-value"])) for b in bars] ==
             [(r[0], r[2]) for r in rounds], "each bar holds its round's participants")
        offered = dom.find("rect", "offered")
        t.ok([(int(b["data-round"]), int(b["data-value"])) for b in offered] ==
             [(r[0], r[1]) for r in rounds], "each round's offered bar holds its offered count")
        heights = [float(b["height"]) for b in bars]
        tallest = max(r[2] for r in rounds)
        ok_h = all(close(h / max(heights), r[2] / tallest, 1e-3) for h, r in zip(heights, rounds))
        t.ok(ok_h, "bar heights are proportional to the participants")

        for name in ("accuracy", "loss"):
            want = db.execute("SELECT round, avg(value) FROM eval_metrics WHERE name = ? "
                              "GROUP BY round ORDER BY round", (name,)).fetchall()
            groups = [a for a in dom.find("g", "points") if a.get("data-series") == name]
            pts = []
            seen = False
            for tag, a in dom.els:
                if tag == "g" and "points" in (a.get("class") or ""):
                    seen = a.get("data-series") == name
                elif tag == "circle" and seen and "pt" in (a.get("class") or ""):
                    pts.append((int(a["data-round"]), float(a["data-value"])))
            t.ok(len(groups) == 1 and len(pts) == len(want) and len(want) >= 2 and
                 all(p[0] == w[0] and close(p[1], w[1]) for p, w in zip(pts, want)),
                 "%s chart: %d points equal the evaluation reports in the store" % (name, len(pts)))

        trainers = db.execute("SELECT id, name FROM clients WHERE role = 'trainer'").fetchall()
        status = {(c, r): s for r, c, s in db.execute(
            "SELECT round, client, status FROM participation WHERE round > 0")}
        cells = dom.find("rect", "cell")
        t.ok(len(cells) == len(trainers) * len(rounds),
             "heatmap: %d cells = %d trainers x %d rounds"
             % (len(cells), len(trainers), len(rounds)))
        by_name = {n: i for i, n in trainers}
        good = all(c["data-status"] == status.get((by_name[c["data-client"]], int(c["data-round"])),
                                                  "absent") for c in cells)
        t.ok(good, "every heatmap cell shows that client's status in that round")
        kinds = {c["data-status"] for c in cells}
        t.ok({"accepted", "rejected", "declined"} <= kinds,
             "the heatmap shows accepted, declined and rejected cells (%s)" % sorted(kinds))
        t.ok("evaluator-1" not in {c["data-client"] for c in cells},
             "the evaluator has no row in the heatmap")
        card = [a for a in dom.find("section") if a.get("id") == "progress-card"]
        t.ok(card and card[0].get("data-phase") == "waiting" and
             card[0].get("data-round") == str(st["round"]["id"]) and
             card[0].get("data-offered") == "0",
             "the progress card shows round %s waiting" % st["round"]["id"])
        db.close()

        shot = os.path.join(build, "dashboard.png")
        if os.path.exists(shot):
            os.unlink(shot)
        r = chromium(binary, url, profile, ["--window-size=1280,1100", "--screenshot=" + shot])
        t.ok(r.returncode == 0 and os.path.exists(shot) and os.path.getsize(shot) > 10000,
             "screenshot saved to %s" % shot)
        rc = fed.shutdown()
        t.ok(rc == 0 and "Sanitizer" not in fed.env.log(),
             "cohortd stops cleanly after serving the dashboard (exit %s)" % rc)
    finally:
        fed.stop()
        shutil.rmtree(profile, ignore_errors=True)
    t.done()


if __name__ == "__main__":
    main()

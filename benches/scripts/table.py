"""Turns outbox-bench JSON lines into the docs/PERFORMANCE.md table."""
import json
import sys

print("| backend | B | partitions | mode | inst | floor insert / delete rows/s | ceiling msg/s | engine e2e msg/s | × ceiling | × insert floor | enqueue msg/s (· producers alone, × insert floor) | latency p50 / p99 ms | vacuum s | RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    d = json.loads(line)
    a, f, e = d["args"], d.get("floor") or {}, d.get("engine") or {}
    lat = e.get("latency_ms", {})
    floor = "%.0f / %.0f" % (f["insert_rows_per_s"], f["delete_rows_per_s"]) if f else "-"
    ceil = "%.0f" % f["design_ceiling_msg_per_s"] if f else "-"
    r1 = "%.2f" % d["ratio_to_ceiling"] if d.get("ratio_to_ceiling") else "-"
    r2 = "%.2f" % d["ratio_to_insert_floor"] if d.get("ratio_to_insert_floor") else "-"
    enq = "%.0f" % e.get("enqueue_msg_per_s", 0)
    if d.get("enqueue_only_msg_per_s"):
        enq += " · alone %.0f (%.2f ×)" % (d["enqueue_only_msg_per_s"], d["enqueue_only_ratio_to_insert_floor"])
    mode = a["mode"]
    if a.get("producers_in", "first") != "first":
        mode += ", producers " + a["producers_in"]
    if a.get("rate"):
        mode += ", %d msg/s" % a["rate"]
    print("| %s | %d | %d | %s | %d | %s | %s | %.0f | %s | %s | %s | %.1f / %.1f | %.2f | %.0f |" % (
        d["backend"], a["batch"], a["partitions"], mode, a["instances"], floor, ceil,
        e.get("end_to_end_msg_per_s", 0), r1, r2, enq,
        lat.get("p50", 0), lat.get("p99", 0), e.get("vacuum_s", 0), e.get("peak_rss_mib", 0)))

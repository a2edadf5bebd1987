"""Formats one `weir-bench storage --json` report (stdin) as a Markdown table row."""
import json
import sys

r = json.load(sys.stdin)
flags = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "(defaults)"
cells = [
    f"`{flags}`",
    r["engine"],
    r["write_mode"],
    r["flush"],
    f"{r['logs']} × {r['writers']}",
    f"{r['batch_bytes'] // 1024} KiB",
    f"{r['raw_sync_mb_s']:.0f}",
    f"{r['raw_direct_mb_s']:.0f}",
    f"{r['raw_direct_sync_mb_s']:.0f}",
    f"**{r['weir_mb_s']:.0f}**",
    f"{r['ratio_direct']:.2f}",
    f"{r['ratio_sync']:.2f}",
    f"{r['append_p50_us']} / {r['append_p99_us']}",
    f"{r['read_mb_s']:.0f} / {r['read_first_pass_mb_s']:.0f}",
]
print("| " + " | ".join(cells) + " |")

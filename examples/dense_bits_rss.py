import json, subprocess, sys
PROBE = open("/work/wt/dense/tests/test_dense_bits.py").read().split('PROBE = """')[1].split('"""')[0]
path = "/tmp/dbench/mixtral08"
res = {}
for label, args in [("none", ["none"]), ("4 (quantize, write cache)", ["4", "/tmp/dbench/rss-store"]),
                    ("4 (from cache)", ["4", "/tmp/dbench/rss-store"]), ("4 (store ram, no cache)", ["4"])]:
    o = subprocess.run([sys.executable, "-c", PROBE, path, *args], capture_output=True, text=True, check=True)
    res[label] = {k: v / 2**20 for k, v in json.loads(o.stdout.strip().splitlines()[-1]).items()}
print(json.dumps(res, indent=1))

"""Mutation check of the map's tests: put one deliberate mistake at a time into the core's formula
(paper Eqs. 8-12), run the reference tests, and record which fail; each file is restored afterwards.

    python bench/mutation_check.py            # about 20 min on 2 cores; writes mutations.json

Every mutation must make tests fail; a mutation that leaves them green is a hole in the suite.
The comparison with the authors' release runs only where DEQFUSION_OFFICIAL is set (see .ci/run).
"""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
M = [
 ("gate bias (n-1)*b_a removed", "core/blocks.py", "alpha_sum = alpha_sum + (n - 1) * self.gate.bias", "alpha_sum = alpha_sum + 0 * self.gate.bias"),
 ("x_i injection removed (GN(W2 h) not GN(W2 h + x))", "core/blocks.py", "h = self.norm2(self.lin2(h) + x)", "h = self.norm2(self.lin2(h))"),
 ("x_fuse removed from Eq. 12", "core/blocks.py", "return self.norm(F.relu(self.fuse(total) + x_fuse))", "return self.norm(F.relu(self.fuse(total)))"),
 ("GroupNorm 1 dropped", "core/blocks.py", "h = F.relu(self.norm1(self.lin1(z)))", "h = F.relu(self.lin1(z))"),
 ("GroupNorm 3 dropped", "core/blocks.py", "out = self.norm3(F.relu(h))", "out = F.relu(h)"),
 ("fusion GroupNorm dropped", "core/blocks.py", "return self.norm(F.relu(self.fuse(total) + x_fuse))", "return F.relu(self.fuse(total) + x_fuse)"),
 ("ReLU before GN3 dropped", "core/blocks.py", "out = self.norm3(F.relu(h))", "out = self.norm3(h)"),
 ("residual +z dropped", "core/blocks.py", "            h = h + z\n", "            h = h\n"),
 ("gate sigmoid added", "core/blocks.py", "total = alpha_sum * z_fuse", "total = torch.sigmoid(alpha_sum) * z_fuse"),
 ("purify with z_i instead of z_fuse (alpha_i*z_i)", "core/blocks.py", "total = alpha_sum * z_fuse", "total = alpha_sum * sum(z_modalities) / n"),
 ("Jacobi order (fusion reads old z_i)", "core/layer.py", "z_fuse = self.fusion_block(states[-1], zs, x_fuse, masks[-1])", "z_fuse = self.fusion_block(states[-1], states[:n] if self.modality_blocks is not None else zs, x_fuse, masks[-1])"),
 ("x_fuse bias dropped", "core/layer.py", "return sum(w[i] * x for i, x in enumerate(xs)) + self.fuse_bias", "return sum(w[i] * x for i, x in enumerate(xs)) + 0 * self.fuse_bias"),
]
TESTS = ["tests/test_layer_reference.py", "tests/test_bench_smoke.py"]
out = []
for name, f, old, new in M:
    p = ROOT / f
    src = p.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    try:
        p.write_text(src.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                           cwd=ROOT, capture_output=True, text=True)
        last = r.stdout.strip().splitlines()[-1]
        failed = sorted({ln.split("::")[0].split("/")[-1] + "::" + ln.split("::")[1].split("[")[0].split(" ")[0]
                         for ln in r.stdout.splitlines() if ln.startswith("FAILED")})
    finally:
        p.write_text(src)
    out.append({"mutation": name, "summary": last, "failed_tests": failed})
    print(json.dumps(out[-1]), flush=True)
json.dump(out, open("mutations.json", "w"), indent=1)
holes = [o["mutation"] for o in out if not o["failed_tests"]]
print("mutations the tests miss:", holes or "none")
sys.exit(1 if holes else 0)

"""adapters/common/point_ops against brute-force references of the PointNet++ CUDA kernels.

The references are written from the kernels (votenet/imvotenet ``pointnet2/_ext_src/src/*.cu``) as
plain loops: FPS as the kernel runs it (strided threads, tree reduction), ball query and three_nn
from full distance matrices, gather/group/interpolate element by element.
"""
import numpy as np
import pytest
import torch

from deqfusion.adapters.common import point_ops as ops


def _cloud(b, n, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, 3, generator=g, dtype=dtype) * 2 - 1) * scale


# ---------------------------------------------------------------- furthest point sampling
def _fps_kernel_loop(xyz: np.ndarray, m: int) -> list:
    """The FPS kernel for one batch element, thread by thread, in float32."""
    n = len(xyz)
    pts = xyz.astype(np.float32)
    threads = min(1 << (n.bit_length() - 1), 512)
    temp = np.full(n, np.float32(1e10), dtype=np.float32)
    out, old = [0], 0
    for _ in range(1, m):
        best = [np.float32(-1)] * threads
        besti = [0] * threads
        for tid in range(threads):
            for k in range(tid, n, threads):
                p = pts[k]
                if p[0] * p[0] + p[1] * p[1] + p[2] * p[2] <= np.float32(1e-3):
                    continue
                q = pts[old]
                d = (p[0] - q[0]) * (p[0] - q[0]) + (p[1] - q[1]) * (p[1] - q[1]) + (p[2] - q[2]) * (p[2] - q[2])
                d2 = min(d, temp[k])
                temp[k] = d2
                if d2 > best[tid]:
                    best[tid], besti[tid] = d2, k
        s = threads // 2
        while s >= 1:
            for tid in range(s):
                v1, v2 = best[tid], best[tid + s]
                i1, i2 = besti[tid], besti[tid + s]
                best[tid] = max(v1, v2)
                besti[tid] = i2 if v2 > v1 else i1
            s //= 2
        old = besti[0]
        out.append(old)
    return out


def _fps_greedy(xyz: torch.Tensor, m: int) -> list:
    """Textbook FPS: repeatedly take the point furthest from the chosen set (no ties in random data)."""
    chosen = [0]
    d = ((xyz - xyz[0]) ** 2).sum(-1)
    for _ in range(1, m):
        nxt = int(d.argmax())
        chosen.append(nxt)
        d = torch.minimum(d, ((xyz - xyz[nxt]) ** 2).sum(-1))
    return chosen


def test_fps_matches_greedy_definition_on_random_clouds():
    xyz = _cloud(3, 300, seed=0, scale=2.0, dtype=torch.float64)
    got = ops.furthest_point_sample(xyz, 40)
    assert got.dtype == torch.int32 and got.shape == (3, 40)
    for b in range(3):
        assert got[b].tolist() == _fps_greedy(xyz[b], 40)
    assert len(set(got[0].tolist())) == 40  # distinct while distinct points remain


@pytest.mark.parametrize(
    "n,m,distinct",
    [(37, 12, 37), (37, 20, 6), (700, 30, 700), (700, 40, 9)],
    ids=["small", "small-duplicates", "512-threads", "512-threads-duplicates"],
)
def test_fps_matches_the_kernel_loop_including_ties(n, m, distinct):
    g = torch.Generator().manual_seed(n + m)
    base = _cloud(1, distinct, seed=n * m)[0] + 0.1
    xyz = base if distinct == n else base[torch.randint(0, distinct, (n,), generator=g)]
    if distinct < n:  # exact ties everywhere once the distinct points are used up
        assert m > distinct
    got = ops.furthest_point_sample(xyz[None], m)[0].tolist()
    assert got == _fps_kernel_loop(xyz.numpy(), m)


def test_fps_never_picks_points_at_the_origin_after_the_first():
    xyz = _cloud(1, 50, seed=3)
    xyz[0, 10] = 0.0  # |p|^2 <= 1e-3: the kernel skips it
    xyz[0, 20] = 0.01
    xyz[0, 0] = 0.0  # the first index is 0 whatever it holds
    got = ops.furthest_point_sample(xyz, 50)[0].tolist()
    assert got[0] == 0 and 10 not in got[1:] and 20 not in got[1:] and 0 not in got[1:]
    assert got == _fps_kernel_loop(xyz[0].numpy(), 50)


def test_fps_degenerate_sizes():
    xyz = _cloud(2, 5, seed=4)
    assert ops.furthest_point_sample(xyz, 1).tolist() == [[0], [0]]
    assert ops.furthest_point_sample(xyz, 0).shape == (2, 0)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        ops.furthest_point_sample(xyz[..., :2], 3)


# ---------------------------------------------------------------- ball query
def _ball_query_loop(radius, nsample, xyz, new_xyz):
    d2 = ((new_xyz[:, :, None, :] - xyz[:, None, :, :]) ** 2).sum(-1)  # full (B, M, N) matrix
    out = torch.zeros(new_xyz.shape[0], new_xyz.shape[1], nsample, dtype=torch.int32)
    for b in range(d2.shape[0]):
        for j in range(d2.shape[1]):
            found = [k for k in range(d2.shape[2]) if d2[b, j, k] < radius * radius][:nsample]
            if found:
                out[b, j] = torch.tensor(found + [found[0]] * (nsample - len(found)), dtype=torch.int32)
    return out


def test_ball_query_matches_full_distance_matrix():
    xyz = _cloud(2, 200, seed=5, dtype=torch.float64)
    new_xyz = _cloud(2, 30, seed=6, dtype=torch.float64)
    got = ops.ball_query(0.35, 8, xyz, new_xyz)
    want = _ball_query_loop(0.35, 8, xyz, new_xyz)
    assert got.dtype == torch.int32 and got.shape == (2, 30, 8)
    assert torch.equal(got, want)
    counts = [len(set(r.tolist())) for r in got.reshape(-1, 8)]
    assert min(counts) < 8 and max(counts) == 8  # both full and short balls were exercised


def test_ball_query_short_empty_and_duplicate_balls():
    xyz = torch.tensor([[[5.0, 5, 5], [0.0, 0, 0], [0.1, 0, 0], [0.1, 0, 0], [3.0, 0, 0]]])
    new_xyz = torch.tensor([[[0.0, 0, 0], [3.0, 0, 0], [-9.0, 0, 0]]])
    got = ops.ball_query(0.5, 4, xyz, new_xyz)
    assert got[0, 0].tolist() == [1, 2, 3, 1]  # 3 inside (one duplicate): the rest repeat the first
    assert got[0, 1].tolist() == [4, 4, 4, 4]
    assert got[0, 2].tolist() == [0, 0, 0, 0]  # none inside: zeros
    # the boundary is strict: a point at exactly the radius is outside
    edge = torch.tensor([[[9.0, 0, 0], [0.5, 0, 0], [0.0, 0.25, 0]]])
    assert ops.ball_query(0.5, 2, edge, torch.zeros(1, 1, 3)).tolist() == [[[2, 2]]]
    assert torch.equal(got, _ball_query_loop(0.5, 4, xyz, new_xyz))


def test_ball_query_chunked_equals_unchunked(monkeypatch):
    xyz = _cloud(2, 300, seed=7)
    new_xyz = _cloud(2, 64, seed=8)
    whole = ops.ball_query(0.3, 16, xyz, new_xyz)
    monkeypatch.setattr(ops, "_CHUNK_ELEMS", 2 * 300 * 5)  # 5 centres per block: 13 blocks
    assert torch.equal(ops.ball_query(0.3, 16, xyz, new_xyz), whole)


# ---------------------------------------------------------------- three_nn
def test_three_nn_matches_cdist_and_sort():
    unknown = _cloud(2, 50, seed=9, dtype=torch.float64)
    known = _cloud(2, 40, seed=10, dtype=torch.float64)
    dist, idx = ops.three_nn(unknown, known)
    full = torch.cdist(unknown, known)
    want_d, want_i = full.sort(dim=-1, stable=True)
    assert idx.dtype == torch.int32
    assert torch.equal(idx.long(), want_i[..., :3])
    torch.testing.assert_close(dist, want_d[..., :3])  # Euclidean, like pointnet2_utils.three_nn
    d2, idx2 = ops.three_nn_squared(unknown, known)
    torch.testing.assert_close(d2, want_d[..., :3] ** 2)  # the kernel's own (squared) output
    assert torch.equal(idx2, idx)


def test_three_nn_ties_and_too_few_known_points():
    known = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0.0, 2, 0], [-1.0, 0, 0]]])
    dist, idx = ops.three_nn(torch.zeros(1, 1, 3), known)
    assert idx[0, 0].tolist() == [0, 1, 3]  # equal distances: lower index first
    assert dist[0, 0].tolist() == [1.0, 1.0, 1.0]
    dist, idx = ops.three_nn(torch.zeros(1, 2, 3), known[:, :2])
    assert idx[0, 0].tolist() == [0, 1, 0] and dist[0, 0, 2] == float("inf")  # kernel: idx 0, 1e40


def test_three_nn_chunked_equals_unchunked(monkeypatch):
    unknown, known = _cloud(2, 90, seed=11), _cloud(2, 70, seed=12)
    d, i = ops.three_nn(unknown, known)
    monkeypatch.setattr(ops, "_CHUNK_ELEMS", 2 * 70 * 7)
    d2, i2 = ops.three_nn(unknown, known)
    assert torch.equal(i, i2) and torch.equal(d, d2)


# ---------------------------------------------------------------- gather / group / interpolate
def test_gather_group_interpolate_match_explicit_loops():
    g = torch.Generator().manual_seed(13)
    feats = torch.randn(2, 4, 10, generator=g)
    idx = torch.randint(0, 10, (2, 6), generator=g, dtype=torch.int32)
    got = ops.gather_points(feats, idx)
    for b in range(2):
        for c in range(4):
            for j in range(6):
                assert got[b, c, j] == feats[b, c, idx[b, j]]
    gidx = torch.randint(0, 10, (2, 3, 5), generator=g, dtype=torch.int32)
    grouped = ops.group_points(feats, gidx)
    assert grouped.shape == (2, 4, 3, 5)
    assert grouped._base is None  # a new tensor, not a view: autograd.Function outputs get modified in place
    for b in range(2):
        for c in range(4):
            for j in range(3):
                for k in range(5):
                    assert grouped[b, c, j, k] == feats[b, c, gidx[b, j, k]]
    tidx = torch.randint(0, 10, (2, 7, 3), generator=g, dtype=torch.int32)
    w = torch.rand(2, 7, 3, generator=g)
    interp = ops.three_interpolate(feats, tidx, w)
    assert interp.shape == (2, 4, 7)
    for b in range(2):
        for c in range(4):
            for i in range(7):
                want = sum(w[b, i, j] * feats[b, c, tidx[b, i, j]] for j in range(3))
                torch.testing.assert_close(interp[b, c, i], want)


def test_gradients_by_gradcheck_float64_with_repeated_indices():
    g = torch.Generator().manual_seed(14)
    feats = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 0, 5, 2], [1, 1, 1, 3]], dtype=torch.int32)  # repeats: gradients accumulate
    gidx = torch.randint(0, 6, (2, 4, 3), generator=g, dtype=torch.int32)
    tidx = torch.randint(0, 6, (2, 5, 3), generator=g, dtype=torch.int32)
    w = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ops.gather_points(f, idx), (feats,))
    assert torch.autograd.gradcheck(lambda f: ops.group_points(f, gidx), (feats,))
    assert torch.autograd.gradcheck(lambda f: ops.three_interpolate(f, tidx, w), (feats,))
    # the accumulated gradient equals the kernel's atomicAdd: number of times each index is used
    ops.gather_points(feats, idx).sum().backward()
    assert feats.grad[0, 0].tolist() == [2, 0, 1, 0, 0, 1] and feats.grad[1, 0].tolist() == [0, 3, 0, 1, 0, 0]
    # like the upstream wrapper, the interpolation weights get no gradient
    w.requires_grad_(True)
    assert not ops.three_interpolate(feats.detach(), tidx, w).requires_grad


def test_large_cloud_never_builds_an_n_by_n_block(monkeypatch):
    """(B=2, N=20000): every distance block stays within the chunk budget."""
    sizes = []
    real = ops._sqdist

    def spy(a, b):
        out = real(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(ops, "_sqdist", spy)
    xyz = _cloud(2, 20000, seed=15, scale=3.0)
    centres = xyz[:, :256]
    idx = ops.ball_query(0.2, 64, xyz, centres)
    assert idx.shape == (2, 256, 64)
    own = torch.arange(256, dtype=torch.int32)[None, :, None]
    assert (idx == own).any(-1).all()  # every centre finds itself
    dist, _ = ops.three_nn(xyz, centres)
    assert dist.shape == (2, 20000, 3) and torch.isfinite(dist).all()
    assert ops.furthest_point_sample(xyz, 4).shape == (2, 4)
    assert sizes and max(sizes) <= ops._CHUNK_ELEMS < 2 * 20000 * 20000

import numpy as np
import pytest

import edgec
from edgec.errors import UserError


@pytest.mark.parametrize("which", [0, 1])
def test_session_contract(dit_tiny_artifacts, which):
    art = dit_tiny_artifacts[which]
    sess = edgec.load(art.path)
    assert [i.name for i in sess.inputs] == ["latent", "timestep", "text"]
    assert [o.name for o in sess.outputs] == ["output"]
    feeds = sess.default_feeds
    out = sess.run(feeds)["output"]
    assert out.shape == feeds["latent"].shape and out.dtype == np.float32
    stats = sess.benchmark(warmup=1, iterations=3)
    assert set(stats) >= {"p50_ms", "p90_ms", "mean_ms"} and stats["p50_ms"] > 0


def test_dynamic_batch_runs_on_both_runtimes(dit_tiny_artifacts):
    a, b = (edgec.load(x.path) for x in dit_tiny_artifacts)
    feeds = {k: np.concatenate([v, v, v][: 3]) if k != "timestep" else np.concatenate([v] * 3)
             for k, v in a.default_feeds.items()}
    oa, ob = a.run(feeds)["output"], b.run(feeds)["output"]
    assert oa.shape[0] == 3 * a.default_feeds["latent"].shape[0]
    np.testing.assert_allclose(ob, oa, rtol=1e-4, atol=1e-4)


def test_bad_feeds_are_user_errors(dit_tiny_artifacts):
    sess = edgec.load(dit_tiny_artifacts[1].path)
    feeds = dict(sess.default_feeds)
    with pytest.raises(UserError, match="missing"):
        sess.run({k: v for k, v in feeds.items() if k != "text"})
    with pytest.raises(UserError, match="shape"):
        sess.run({**feeds, "latent": feeds["latent"][0]})
    with pytest.raises(UserError, match="could not run the model"):  # W=1 < patch size
        sess.run({**feeds, "latent": feeds["latent"][..., :1]})
    with pytest.raises(UserError, match="dtype"):
        sess.run({**feeds, "latent": feeds["latent"].astype(np.complex64)})


def test_load_refuses_non_artifacts(tmp_path):
    with pytest.raises(UserError, match="no such artifact"):
        edgec.load(tmp_path / "missing")
    with pytest.raises(UserError, match="not an edgec artifact"):
        edgec.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        edgec.load(tmp_path)

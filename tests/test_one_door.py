"""One door (issue 34): adapters.open_flow turns every source into the same
Flow, and the recipes are classes per kind."""
import pytest
import torch
from torch import nn

from flowjac.engine.checkpoints import load_checkpoint, save_checkpoint
from flowjac.models import adapters, pretrained
from flowjac.models.nets import MLPFlow


def test_a_shipped_name_and_its_file_open_alike():
    named = adapters.open_flow("mnist-fives")
    pre = pretrained.load("mnist-fives")
    assert pre.as_flow() is not named          # each load opens the file again
    src = named.source
    assert (src["kind"], src["name"], src["format"]) == ("shipped", "mnist-fives", "flowjac")
    assert src["sha256"] == pre.manifest["mnist-fives"]["sha256"]
    assert named.latent_shape == pre.latent_shape == (1, 28, 28)
    assert named.sampler == pre.sampler and named.value_range == (0.0, 1.0)
    # the same file opened as a path: the same velocity
    path = pretrained.WEIGHTS_DIR / pre.manifest["mnist-fives"]["file"]
    as_file = adapters.open_flow(path)
    assert as_file.source["kind"] == "flowjac"
    x, t = torch.randn(2, 1, 28, 28), torch.tensor(0.4)
    assert torch.equal(named.velocity(x, t), as_file.velocity(x, t))
    assert torch.equal(named.sample(3, steps=2), pre.as_flow().sample(3, steps=2))
    # torchcfm's shipped flow comes through the door a user's file takes
    cfm = adapters.open_flow("mnist-fives-torchcfm")
    assert (cfm.source["format"], cfm.value_range) == ("torchcfm", (-1.0, 1.0))
    with pytest.raises(ValueError, match="'mnist-digits' holds no flow"):
        adapters.open_flow("mnist-digits")


def test_ema_weights_are_loaded_directly_and_checked(tmp_path):
    torch.manual_seed(0)
    model = MLPFlow(dim=3, hidden=8)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", model, ema=ema, config={"sampler": {
        "method": "rk4", "steps": 3}})
    flow = adapters.open_flow(tmp_path / "c.pt")
    for k, v in flow.model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert flow.sampler == {"method": "rk4", "steps": 3} and flow.latent_shape == (3,)
    assert flow.source["step"] == 0
    raw = MLPFlow(dim=3, hidden=8)
    load_checkpoint(tmp_path / "c.pt", raw)       # ema=False: the raw weights
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())
    save_checkpoint(tmp_path / "bad.pt", model, ema={k: v[..., :1] for k, v in ema.items()})
    with pytest.raises(ValueError, match="its EMA weights do not match its MLPFlow"):
        adapters.open_flow(tmp_path / "bad.pt")


def test_a_torchcfm_file_a_network_and_a_callable_become_one_flow(tmp_path):
    pytest.importorskip("torchcfm")
    from torchcfm.models.models import MLP

    torch.manual_seed(0)
    mlp = MLP(dim=2, w=8, time_varying=True).eval()
    torch.save({"ema_model": mlp.state_dict(), "step": 11}, tmp_path / "m.pt")
    from_file = adapters.open_flow(tmp_path / "m.pt", format="torchcfm",
                                   arch='{"dim": 2, "w": 8, "time_varying": true}')
    from_net = adapters.open_flow(mlp, format="torchcfm")
    fn = adapters.open_flow(lambda x, t: mlp(torch.cat([x, t.expand(x.shape[0], 1)], 1)),
                            order="x,t", latent_shape=(2,))
    assert from_file.source == dict(kind="torchcfm", path=str(tmp_path / "m.pt"), step=11,
                                    config={})
    assert from_file.latent_shape == from_net.latent_shape == fn.latent_shape == (2,)
    want = from_file.sample(4, seed=3)
    torch.testing.assert_close(from_net.sample(4, seed=3), want)
    torch.testing.assert_close(fn.sample(4, seed=3), want)
    x, v = torch.randn(4, 2), torch.randn(4, 2)
    torch.testing.assert_close(fn.velocity.jvp(x, 0.3, v)[1],
                               from_file.velocity.jvp(x, 0.3, v)[1])
    with pytest.raises(ValueError, match="order must be given"):
        adapters.open_flow(lambda x, t: x, latent_shape=(2,))
    with pytest.raises(ValueError, match="latent_shape must be given"):
        adapters.open_flow(lambda x, t: x, order="x,t")
    with pytest.raises(ValueError, match="arch, model_class apply to --format"):
        adapters.open_flow(tmp_path / "m.pt", arch={"dim": 2}, model_class="a:B")


def test_flow_matching_classes_with_a_wrapper(tmp_path):
    pytest.importorskip("flow_matching")
    from flow_matching.utils import ModelWrapper

    class Net(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lin = nn.Linear(dim + 1, dim)

        def forward(self, x, t):
            return self.lin(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t)

    torch.manual_seed(0)
    net = Net(3)
    torch.save({"model": net.state_dict()}, tmp_path / "fm.pt")
    flow = adapters.open_flow(tmp_path / "fm.pt", format="flow_matching",
                              model_class=Net, wrapper=Wrapped, arch={"dim": 3},
                              latent_shape=[3], value_range=(-1, 1))
    assert isinstance(flow.model, Wrapped) and flow.value_range == (-1.0, 1.0)
    x = torch.randn(2, 3)
    torch.testing.assert_close(flow.velocity(x, 0.5), net(x, torch.tensor(0.5)))
    with pytest.raises(ValueError, match="model_class must be a torch.nn.Module subclass"):
        adapters.open_flow(tmp_path / "fm.pt", format="flow_matching", model_class=dict,
                           arch={}, latent_shape=[3])


def test_recipes_are_classes_per_kind():
    kinds = {part: type(pretrained.recipe(part)).__name__ for part in pretrained.RECIPES}
    assert kinds == {"scm-classifier": "AttributeClassifierRecipe",
                     "scm-flow": "FlowRecipe",
                     "scm-conditional": "ConditionalFlowRecipe",
                     "mnist-digits": "ClassifierRecipe",
                     "mnist-fives": "FlowRecipe",
                     "mnist-fives-torchcfm": "TorchcfmFlowRecipe"}
    assert all(isinstance(r, dict) for r in pretrained.RECIPES.values())
    assert pretrained.recipe("mnist-fives-torchcfm").latent_shape == (1, 28, 28)
    assert pretrained.recipe("mnist-digits").attr_names[-1] == "9"
    with pytest.raises(ValueError, match="part 'scm-classifier' is a classifier"):
        pretrained.velocity_of("scm-classifier", None)
    with pytest.raises(ValueError, match="part must be one of"):
        pretrained.recipe("celeba")


def test_sample_and_probe_shard_into_the_single_process_result():
    """Each rank's share (a Context without a process group keeps only its own
    rows) adds up to the one-process result, entry for entry."""
    from flowjac.engine import probing
    from flowjac.engine.distributed import Context

    flow = adapters.open_flow(lambda x, t: -0.3 * x * (1 + t), order="x,t", latent_shape=(3,))
    one = pretrained.sample(flow.velocity, (3,), 7, steps=3, batch_size=2)
    parts = [pretrained.sample(flow.velocity, (3,), 7, steps=3, batch_size=2,
                               ctx=Context(rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(parts[0] + parts[1], one)
    assert not torch.equal(parts[0], one)

    def readout(x):
        return torch.tanh(x[:, :2])
    kw = dict(k=2, steps=2, batch_size=2, result_dtype=None, paper=False)
    whole = probing.probe(flow.velocity, readout, (3,), 5, **kw)
    shards = [probing.probe(flow.velocity, readout, (3,), 5, ctx=Context(rank=r, world_size=2),
                            **kw) for r in (0, 1)]
    assert "paper_change" not in whole and whole["jvp"].dtype == torch.float64
    for key in ("out", "jvp", "rho", "out_pair", "jvp_pair"):
        assert torch.equal(shards[0][key] + shards[1][key], whole[key]), key


def test_the_cli_module_loads_and_computes_nothing_itself():
    import inspect
    import re

    from flowjac import cli

    source = inspect.getsource(cli)
    assert not re.search(r"torch\.load\((?!\.\.\.)", source)   # the help's example aside
    for name in ("read_checkpoint", "load_checkpoint", "velocity_fn",
                 "integrate(", "attribute_jvp", "covariance_from_pairs", "import_class(",
                 "load_torchcfm_checkpoint", "load_flow_matching_checkpoint"):
        assert name not in source, name

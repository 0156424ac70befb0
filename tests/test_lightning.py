"""CurvatureCallback with a real Lightning Trainer on the CPU: checks, training untouched, files."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests.analysis.test_monitor import dense_hessian
from torch_secorder import CurvatureHistory
from torch_secorder.lightning import CurvatureCallback

lightning = pytest.importorskip("lightning")

F64 = torch.float64


class Regression(lightning.LightningModule):
    """A tanh MLP 3-6-2 in float64 with an MSE loss."""

    def __init__(self, optimizer="sgd"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        if self.optimizer == "two":
            first, second = self.net[0].parameters(), self.net[2].parameters()
            return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)]
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(lightning.pytorch.loggers.Logger):
    """A logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def data(n=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randn(n, 2, generator=g, dtype=F64)
    return x, y


def fit(callbacks=(), steps=6, optimizer="sgd", batch_size=16, logger=False, **options):
    lightning.seed_everything(0, verbose=False)
    module = Regression(optimizer)
    x, y = data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size
    )
    trainer = lightning.Trainer(
        max_steps=steps,
        callbacks=list(callbacks),
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
    trainer.fit(module, loader)
    return module, trainer


def test_a_trainer_records_the_sharpness_every_n_steps_and_trains_as_without_it():
    x, y = data()
    callback = CurvatureCallback(nn.MSELoss(), (x, y), every=2, tol=1e-10)
    assert isinstance(callback, lightning.pytorch.Callback)
    module, trainer = fit([callback])
    assert trainer.global_step == 6
    history = callback.history
    steps, values = history.series("eigenvalue")
    assert steps == [2, 4, 6]
    exact = torch.linalg.eigvalsh(dense_hessian(module.net, nn.MSELoss(), (x, y)))[-1]
    assert_close(torch.tensor(values[-1], dtype=F64), exact)  # no step after the last check
    assert history.series("threshold") == ([2, 4, 6], [20.0, 20.0, 20.0])
    plain, _ = fit()
    for a, b in zip(plain.parameters(), module.parameters()):
        assert torch.equal(a, b)


def test_optimizer_steps_are_counted_with_gradient_accumulation():
    x, y = data()
    callback = CurvatureCallback(nn.MSELoss(), (x, y), every=2)
    fit([callback], steps=4, optimizer="adam", batch_size=4, accumulate_grad_batches=2)
    history = callback.history
    assert history.series("eigenvalue")[0] == [2, 4]
    assert history.series("preconditioned_eigenvalue")[0] == [2, 4]
    assert history.series("threshold")[1] == pytest.approx([3800.0, 3800.0])


def test_records_go_to_the_loggers_and_the_history_to_a_file(tmp_path):
    x, y = data()
    recorder = Recorder()
    path = tmp_path / "curvature.csv"
    callback = CurvatureCallback(
        nn.MSELoss(), (x, y), every=3, k=2, groups="module", path=path, optimizer=False
    )
    fit([callback], logger=recorder, log_every_n_steps=1)
    logged = [
        (step, metrics) for step, metrics in recorder.metrics if "curvature/eigenvalue" in metrics
    ]
    assert [step for step, _ in logged] == [3, 6]
    assert set(logged[0][1]) == {
        "curvature/eigenvalue",
        "curvature/eigenvalue_1",
        "curvature/net.0/eigenvalue",
        "curvature/net.0/eigenvalue_1",
        "curvature/net.2/eigenvalue",
        "curvature/net.2/eigenvalue_1",
    }
    assert logged[1][1]["curvature/eigenvalue"] == callback.history.series("eigenvalue")[1][-1]
    assert CurvatureHistory.load(path) == callback.history


def test_state_dict_continues_the_history():
    x, y = data()
    callback = CurvatureCallback(nn.MSELoss(), (x, y), every=2)
    fit([callback], steps=4)
    state = callback.state_dict()
    assert state["steps"] == 4
    resumed = CurvatureCallback(nn.MSELoss(), (x, y), every=2)
    resumed.load_state_dict(state)
    assert resumed.history == callback.history


def test_callbacks_pickle_and_copy():
    x, y = data()
    callback = CurvatureCallback(nn.MSELoss(), (x, y), every=3, k=2, path="h.json")
    for clone in (pickle.loads(pickle.dumps(callback)), copy.deepcopy(callback)):
        assert isinstance(clone, CurvatureCallback)
        assert isinstance(clone, lightning.pytorch.Callback)
        assert (clone.every, clone.options, str(clone.path)) == (3, {"k": 2}, "h.json")


def test_importing_the_module_does_not_import_lightning():
    code = "import sys, torch_secorder.lightning; print('lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_argument_errors():
    x, y = data()
    with pytest.raises(ValueError, match=r"CurvatureCallback: every must be at least 1; got 0\."):
        CurvatureCallback(nn.MSELoss(), (x, y), every=0)
    with pytest.raises(TypeError, match=r"CurvatureCallback: optimizer must be a bool; got str\."):
        CurvatureCallback(nn.MSELoss(), (x, y), optimizer="adam")
    with pytest.raises(
        ValueError, match=r"CurvatureCallback: path must end in \.csv or \.json; got 'h\.txt'\."
    ):
        CurvatureCallback(nn.MSELoss(), (x, y), path="h.txt")
    with pytest.raises(
        TypeError,
        match=r"CurvatureCallback: 'evry' is not an option of CurvatureMonitor; expected one of "
        r"k, params, groups, trace, ",
    ):
        CurvatureCallback(nn.MSELoss(), (x, y), evry=2)


def test_two_optimizers_need_optimizer_false():
    x, y = data()

    class Manual(Regression):
        def __init__(self):
            super().__init__("two")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()

    trainer = lightning.Trainer(
        max_steps=2,
        callbacks=[CurvatureCallback(nn.MSELoss(), (x, y))],
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(
        ValueError,
        match=r"CurvatureCallback: the trainer has 2 optimizers; expected one for the stability "
        r"threshold\. Pass optimizer=False\.",
    ):
        trainer.fit(Manual(), loader)

"""R-CONV: recover a CNN's training image analytically from one step of its gradients.

R-CONV (Eltaras et al., WISE 2024, arXiv 2406.04227) inverts a convolutional network layer
by layer: the Linear layer's input is a ratio of gradients, and each conv layer's input
solves linear systems built from its gradient constraints (and, where the pre-activation
is known, its weight constraints). This module is the suite's public API; the package
`rconv` holds the implementation, one concern per module (see ARCHITECTURE.md).
"""

from rconv.common.errors import RConvError
from rconv.common.paths import resolve_path
from rconv.cases.networks import NETWORKS
from rconv.cases.models import (ACTIVATIONS, LEAKY_SLOPE, MODELS, PRESET_DATASETS, TESTING_PRESETS, ConvNet,
                                activation_name, build_model)
from rconv.cases.data import DATASETS, SAMPLE_PHOTOS, dataset_info, load_images
from rconv.cases.client import DEFENCES, DTYPES, as_dtype, client_gradients, defend
from rconv.cases.setup import Case, setup
from rconv.cases.updates import Update, gradients_from_update
from rconv.cases.privacy import PrivacyBudget, opacus_missing, privacy_budget
from rconv.cases.flower import LocalTraining, flower_client, flower_missing
from rconv.split.linear import LinearSplit, split_linear
from rconv.attack.constraints import grad_constraints, min_filters, weight_constraints
from rconv.attack.activations import RELU_TESTS
from rconv.attack.tolerances import default_relu_tol
from rconv.attack.reconstruct import (FIRST_LAYER_METHODS, LayerReport, Reconstruction, reconstruct,
                                      reconstruct_batch, reconstruct_clients)
from rconv.analysis.reports import (BROKEN_PSNR, GOOD_PSNR, constraint_report, image_metrics, layer_inputs, match_batch,
                                    output_gradients, solve_steps)
from rconv.analysis.summaries import (batch_summary, breaking_points, federated_summary, filter_summary, size_summary, success_rates,
                                      summarize)
from rconv.analysis.plotting import (plot_batches, plot_defences, plot_federated, plot_filters, plot_grid, plot_methods,
                                     plot_precision, plot_psnr, plot_real_networks, plot_reconstruction, plot_sizes,
                                     plot_success)
from rconv.studies.executors import SweepFailed, distributed_missing, executor_for
from rconv.studies.experiments import attack_grid, attack_images, filter_sweep, size_sweep
from rconv.studies.baselines import BASELINES, breaching_missing, compare_baselines, run_baseline
from rconv.studies.batches import batch_sweep
from rconv.studies.federated import dp_sgd, federated_round, fedsgd_fedavg
from rconv.studies.real_networks import attack_networks
from rconv.cli import main

__all__ = [
    "RConvError",  # errors
    "ConvNet", "MODELS", "NETWORKS", "build_model", "ACTIVATIONS", "activation_name", "LEAKY_SLOPE",  # models
    "PRESET_DATASETS", "TESTING_PRESETS",
    "load_images", "dataset_info", "DATASETS", "SAMPLE_PHOTOS", "setup", "Case",  # data and cases
    "resolve_path",  # where relative paths point
    "client_gradients", "defend", "DEFENCES", "as_dtype", "DTYPES",  # client gradients
    "gradients_from_update", "Update", "privacy_budget", "PrivacyBudget", "opacus_missing",  # federated clients
    "flower_client", "LocalTraining", "flower_missing",
    "grad_constraints", "weight_constraints", "min_filters", "default_relu_tol",  # constraints
    "reconstruct", "reconstruct_clients", "Reconstruction", "LayerReport",  # the attack
    "reconstruct_batch",  # reconstruct_clients' former name
    "split_linear", "LinearSplit", "match_batch",  # mini-batches: the Linear layer split, results matched
    "FIRST_LAYER_METHODS", "RELU_TESTS",
    "BASELINES", "run_baseline", "compare_baselines", "breaching_missing",  # optimisation baselines
    "image_metrics", "constraint_report", "solve_steps", "layer_inputs", "output_gradients",  # metrics, reports
    "attack_grid", "attack_images", "filter_sweep", "summarize", "success_rates", "breaking_points",
    "filter_summary", "size_sweep", "size_summary", "BROKEN_PSNR",  # experiment loops
    "batch_sweep", "batch_summary",  # the mini-batch study
    "federated_round", "fedsgd_fedavg", "dp_sgd", "federated_summary", "GOOD_PSNR",  # the federated study
    "attack_networks",  # networks people train
    "executor_for", "SweepFailed", "distributed_missing",  # experiment loops on a Dask cluster
    "plot_reconstruction", "plot_grid", "plot_methods", "plot_psnr", "plot_precision", "plot_defences",
    "plot_filters", "plot_success", "plot_sizes", "plot_batches", "plot_federated", "plot_real_networks",  # plotting
    "main",  # command line
]

if __name__ == "__main__":
    raise SystemExit(main())

"""Distillation losses as pure functions of arrays: `from kd_jax import losses`.

Conventions: logits [B, K], integer labels [B], feature maps NHWC [B, H, W, C],
embeddings [B, D]. A loss that decomposes over examples returns per-example
values [B] (reduce them as you like); a relation over the batch returns a scalar.
Inputs may be any float dtype (bf16 included); computation is float32. Teacher
inputs are constants (no gradient flows into them) unless a docstring says
otherwise. Hyper-parameters are keyword-only. All are safe under jax.jit,
jax.vmap and jax.grad; bad shapes raise a ValueError naming the shapes.

  logits        cross_entropy, kd_loss, logit_mse_loss, dkd_loss, dist_loss,
                teacher_free_kd_loss, virtual_teacher_logits, class_wise_kd_loss,
                residual_error_loss, pseudo_label_loss, labelled_mean_weights, standardize_logits
  features      hint_loss, attention_transfer_loss, fsp_loss, nst_loss,
                factor_transfer_loss, activation_boundary_loss, vid_loss,
                hierarchical_context_loss
  relations     similarity_preserving_loss, rkd_loss, pkt_loss,
                correlation_congruence_loss, consecutive_correlation_loss
  contrastive   CRDBank, crd_init_bank, crd_sample_negatives, crd_loss
  online        mutual_learning_loss, codistillation_loss, gated_ensemble_logits
  self_distillation  multi_exit_kd_loss, sla_loss, sla_joint_labels, sla_aggregated_logits,
                sla_single_logits
  adversarial   adversarial_generator_loss, adversarial_discriminator_loss (AFD)
  attention     attention_map_loss, value_relation, value_relation_loss (MiniLM, TinyBERT)
  collaborative kdcl_ensemble_logits, peer_attention_weights, peer_attention_logits, soft_kl_loss
"""
from kd_jax.losses.adversarial import adversarial_discriminator_loss, adversarial_generator_loss
from kd_jax.losses.attention import attention_map_loss, value_relation, value_relation_loss
from kd_jax.losses.collaborative import (kdcl_ensemble_logits, peer_attention_logits, peer_attention_weights,
                                         soft_kl_loss)
from kd_jax.losses.contrastive import CRDBank, crd_init_bank, crd_loss, crd_sample_negatives
from kd_jax.losses.features import (activation_boundary_loss, attention_transfer_loss, factor_transfer_loss,
                                    fsp_loss, hierarchical_context_loss, hint_loss, nst_loss, vid_loss)
from kd_jax.losses.logits import (class_wise_kd_loss, cross_entropy, dist_loss, dkd_loss, kd_loss,
                                  labelled_mean_weights, logit_mse_loss, pseudo_label_loss, residual_error_loss,
                                  standardize_logits, teacher_free_kd_loss, virtual_teacher_logits)
from kd_jax.losses.online import codistillation_loss, gated_ensemble_logits, mutual_learning_loss
from kd_jax.losses.self_distillation import (multi_exit_kd_loss, sla_aggregated_logits, sla_joint_labels,
                                             sla_loss, sla_single_logits)
from kd_jax.losses.relations import (consecutive_correlation_loss, correlation_congruence_loss, pkt_loss, rkd_loss,
                                     similarity_preserving_loss)

__all__ = [
    "cross_entropy", "kd_loss", "logit_mse_loss", "dkd_loss", "dist_loss", "teacher_free_kd_loss",
    "virtual_teacher_logits", "class_wise_kd_loss", "residual_error_loss", "pseudo_label_loss",
    "labelled_mean_weights", "standardize_logits",
    "hint_loss", "attention_transfer_loss", "fsp_loss", "nst_loss", "factor_transfer_loss",
    "activation_boundary_loss", "vid_loss", "hierarchical_context_loss",
    "similarity_preserving_loss", "rkd_loss", "pkt_loss", "correlation_congruence_loss", "consecutive_correlation_loss",
    "CRDBank", "crd_init_bank", "crd_sample_negatives", "crd_loss",
    "mutual_learning_loss", "codistillation_loss", "gated_ensemble_logits",
    "multi_exit_kd_loss", "sla_loss", "sla_joint_labels", "sla_aggregated_logits", "sla_single_logits",
    "adversarial_generator_loss", "adversarial_discriminator_loss",
    "attention_map_loss", "value_relation", "value_relation_loss",
    "kdcl_ensemble_logits", "peer_attention_weights", "peer_attention_logits", "soft_kl_loss",
]

"""Self-supervised pretraining (MAE / masked image modelling) on unlabelled scans.

Data flow: ``masking`` (seeded block masks) -> ``mim`` / ``mae_transunet`` / ``mae_vit`` (models, all
:class:`pretrain.base.PretrainModel`) built by ``builder`` -> ``losses`` (MSE on masked patches) ->
``engine`` (``pretrain_one_epoch``) -> ``export`` (encoder checkpoint) -> ``cli`` (``medseg-pretrain``).
Loading an encoder into a segmentation model lives in :mod:`medseg_core.models.pretrained`.
"""

"""The SRDTrans network: its sizes (:mod:`~srdvol.model.config`, no torch), layers and
attention, the network (:mod:`~srdvol.model.network`) and its model file
(:mod:`~srdvol.model.checkpoint`)."""

"""ID-only and simple baselines, each exposing a ``common.Ranker`` for the shared evaluator.

  popularity  train-count ranking                       (popularity.Popularity)
  ease        closed-form EASE^R                         (ease.EASE)
  bpr_mf      BPR matrix factorisation                   (bpr_mf.BPRMF)
  lightgcn    LightGCN propagation + BPR                 (lightgcn.LightGCN)
  sasrec      causal Transformer over item sequences     (sasrec.SASRec)
  random      chance level, measured                     (chance.RandomScores)
"""

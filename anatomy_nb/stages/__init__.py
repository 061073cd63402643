"""The five stages, one module each, named like their run-directory folder and notebook:
``extract`` (01), ``hypothesize`` (02), ``plan`` (03), ``train`` (04), ``evaluate`` (05). Each
writes through ``core.run.RunDir`` with the stage protocol of ``core.stage``; the helpers beside them
(``interventions``, ``prediction``, ``dpo``, ``readouts``) serve one stage each."""

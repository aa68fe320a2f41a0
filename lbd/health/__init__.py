"""Finding dead endpoints: active probes (``registry``, ``probes``) and passive ejection
(``outlier``). Both report verdicts to the pools, which own eligibility."""

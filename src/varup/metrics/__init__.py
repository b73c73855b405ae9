"""Evaluation metrics, one module each: Inception weights with provenance (inception), features (features),
FID/KID/PR/IS/PRDC/clean-FID (fidelity), SSIM diversity (diversity), codebook usage (codebook), token calibration
(calibration), CMMD (cmmd), mode coverage (modes), the toy feature space (toyfeatures), and the jobs that run them
(evaluate). Nothing is imported here, so a stage's code fingerprint holds only the metric modules it uses."""

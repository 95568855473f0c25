"""Submit, watch and manage metascale jobs on clusters: Ray's Job Submission API and KubeRay RayJobs."""

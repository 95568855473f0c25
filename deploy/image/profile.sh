# Login shells (KubeRay's `/bin/bash -lc -- "... ray start ..."`): Debian's /etc/profile resets PATH; put the
# image's venv back in front (deploy/Dockerfile).
case ":$PATH:" in
  *:/opt/venv/bin:*) ;;
  *) PATH="/opt/venv/bin:$PATH" ;;
esac
export PATH VIRTUAL_ENV=/opt/venv

#!/bin/bash
# Build a real Kubernetes control plane for the Kubernetes backend's tests, offline, from Debian packages:
# kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from bookworm's `kubernetes` source package
# (full upstream tree with vendor/) built with Debian's Go 1.19, and etcd 3.4 from Debian's etcd-server.
# Nothing is installed system-wide (.debs unpacked with dpkg -x; apt uses a private source list).
#
# Usage: build-k8s.sh OUT_DIR    binaries -> OUT_DIR/bin; a second run with the binaries in place does nothing.
# About 4-5 min on 2 idle cores from clean, 2.3 GB of disk while building, 0.3 GB kept (the work tree is removed).
set -euo pipefail
OUT=$(realpath -m "$1"); W=$OUT/work
if [ -x "$OUT/bin/kube-apiserver" ] && [ -x "$OUT/bin/etcd" ] && [ -x "$OUT/bin/kube-controller-manager" ] \
   && [ -x "$OUT/bin/kube-scheduler" ] && "$OUT/bin/kube-apiserver" --version 2>/dev/null | grep -q v1.20.2; then
  echo "kubernetes control plane already built in $OUT/bin"; exit 0
fi
rm -rf "$W"; mkdir -p "$W/lists/partial" "$W/debs" "$OUT/bin"; cd "$W"
# A private deb-src list built from the machine's own Debian mirror; the system's apt configuration is untouched.
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
echo "deb-src $MIRROR bookworm main" > src.list
echo "deb $MIRROR bookworm main" >> src.list
APT=(-o Dir::Etc::sourcelist="$W/src.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$W/lists"
     -o Dir::Cache::archives="$W/debs")
apt-get "${APT[@]}" update -qq
apt-get "${APT[@]}" source --download-only kubernetes 2>&1 | grep -v "unsandboxed" || true
ls kubernetes_*.orig.tar.gz >/dev/null
(cd debs && apt-get "${APT[@]}" download golang-1.19-go golang-1.19-src etcd-server etcd-client \
   golang-github-modern-go-reflect2-dev 2>&1 | grep -v "unsandboxed" || true)
mkdir -p root; for f in debs/*.deb; do dpkg -x "$f" root; done
tar xzf kubernetes_*.orig.tar.gz
# Go >= 1.18 needs reflect2 >= 1.0.2 (1.0.1 mis-iterates maps); Debian ships 1.0.2 as Go source.
R=kubernetes-1.20.2/vendor/github.com/modern-go/reflect2
rm -f $R/*.go $R/*.s
cp root/usr/share/gocode/src/github.com/modern-go/reflect2/*.go root/usr/share/gocode/src/github.com/modern-go/reflect2/*.s $R/
mkdir -p gopath/src/k8s.io; ln -sfn "$W/kubernetes-1.20.2" gopath/src/k8s.io/kubernetes
export PATH="$W/root/usr/lib/go-1.19/bin:$PATH" GOPATH="$W/gopath" GOCACHE="$W/gocache" \
       GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
cd "$W/gopath/src/k8s.io/kubernetes"    # 1.20 builds in GOPATH mode, as debian/rules does
# pkg/generated/openapi is generated at build time (what `make` would do).
go build -o "$W/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
INPUTS=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) -type f -name '*.go' \
  | sed 's|^\./staging/src/|vendor/|; s|^\./||' | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
  | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)
"$W/openapi-gen" -i "$INPUTS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/api-violations.report"
diff -q "$W/api-violations.report" api/api-rules/violation_exceptions.list
LD="-s -w"
for V in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  LD="$LD -X $V.gitVersion=v1.20.2 -X $V.gitMajor=1 -X $V.gitMinor=20 -X $V.gitTreeState=clean"
done
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  go build -p "${GO_JOBS:-2}" -trimpath -ldflags "$LD" -o "$OUT/bin/$c.tmp" ./cmd/$c
  mv "$OUT/bin/$c.tmp" "$OUT/bin/$c"
done
cp "$W/root/usr/bin/etcd" "$W/root/usr/bin/etcdctl" "$OUT/bin/"
cd "$OUT"; rm -rf "$W"
"$OUT/bin/kube-apiserver" --version; "$OUT/bin/etcd" --version | head -1

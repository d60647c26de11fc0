#!/bin/bash
# Certificates and an admin kubeconfig for a throwaway kube-apiserver on 127.0.0.1:PORT (tests/kubernetes.rs).
# Usage: pki.sh RUN_DIR PORT    -> RUN_DIR/pki/{ca,apiserver,admin}.{crt,key}, sa.{key,pub}, RUN_DIR/admin.kubeconfig
set -euo pipefail
R=$(realpath -m "$1"); PORT=$2; mkdir -p "$R/pki"; cd "$R/pki"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
sign() { # name subject extensions
  key "$1.key"; openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out "$1.crt" \
    -extfile <(printf "$3") 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -subj /CN=aion-test-ca -days 2 -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
sign apiserver /CN=kube-apiserver 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n'
sign admin "/O=system:masters/CN=aion-admin" 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n'
key sa.key; openssl pkey -in sa.key -pubout -out sa.pub
b64() { base64 -w0 < "$1"; }
cat > "$R/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: aion-test
  cluster: {server: "https://127.0.0.1:$PORT", certificate-authority-data: $(b64 ca.crt)}
users:
- name: aion-admin
  user: {client-certificate-data: $(b64 admin.crt), client-key-data: $(b64 admin.key)}
contexts:
- name: aion-test
  context: {cluster: aion-test, user: aion-admin, namespace: default}
current-context: aion-test
KC

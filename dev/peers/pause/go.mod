module kube-svid-proxy.invalid/test/peers/pause

go 1.24.0

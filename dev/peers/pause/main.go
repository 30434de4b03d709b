// Command pause is the sandbox ("pause") container of the test node's pods (dev/node.ts): it holds the pod's
// namespaces open and does nothing else. Built static (CGO_ENABLED=0) by dev/peers/peers.ts and packed into the
// local image ksp.local/pause:dev by dev/node/images.ts, since no registry is reachable from the test machine.
//
// Like Kubernetes' own pause: it exits 0 on SIGTERM or SIGINT and, being PID 1 of a pod that shares its process
// namespace, reaps every child that is re-parented to it.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (kube-svid-proxy test node)")
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "warning: pause should be the first process")
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			fmt.Fprintf(os.Stderr, "shutting down, got signal %v\n", sig)
			os.Exit(0)
		}
		// Reap every exited child; more than one may be behind a single SIGCHLD.
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

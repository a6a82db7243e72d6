// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"strings"

	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// quietMethods are polled often; they are logged at V(5) only.
var quietMethods = map[string]bool{
	"Probe": true, "NodeGetCapabilities": true, "NodeGetVolumeStats": true,
	"GetPluginInfo": true, "GetPluginCapabilities": true, "ControllerGetCapabilities": true,
}

// volumeIDGetter matches every request that carries a volume ID.
type volumeIDGetter interface{ GetVolumeId() string }

// logInterceptor puts a logger carrying the method (and volume ID) into the
// context, logs the request with secrets stripped, and logs a failure once.
func logInterceptor(base klog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
		logger := base.WithValues("method", method)
		if g, ok := req.(volumeIDGetter); ok && g.GetVolumeId() != "" {
			logger = logger.WithValues("volumeID", g.GetVolumeId())
		}
		level := 2
		if quietMethods[method] {
			level = 5
		}
		logger.V(level).Info("Request", "request", protosanitizer.StripSecrets(req))
		ctx = klog.NewContext(ctx, logger)
		resp, err := handler(ctx, req)
		if err != nil {
			st, _ := status.FromError(err)
			logger.Error(err, "Request failed", "code", st.Code())
			return resp, err
		}
		logger.V(level).Info("Response", "response", protosanitizer.StripSecrets(resp))
		return resp, nil
	}
}

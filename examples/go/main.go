// Command example is a small gRPC client of the ingestion service, built on the
// generated Go stubs in gen/go and the service config shipped beside the protos.
//
// It signs in, creates an API key and uses it from then on, creates an
// mbox_import source from a file in the server's IMPORT_ROOT, follows the
// import until it ends, lists the archived messages, prints the counts and
// revokes the key.
//
//	go run . -addr localhost:8080 -email admin@example.com -password ... \
//	    -mbox takeout/all.mbox -service-config ../../proto/ingestion/v1/ingestion_service_config.json
//
// The password may come from INGESTION_PASSWORD instead. grpc-go before 1.40
// (Debian's is 1.33) applies the config's retry policies only with
// GRPC_GO_RETRY=on in the environment; its timeouts apply either way.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	ingestionv1 "example.com/ingestion-grpc/gen/go/ingestion/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
)

func main() {
	addr := flag.String("addr", "localhost:8080", "the service: Envoy's port or the gRPC server's")
	email := flag.String("email", "admin@example.com", "sign in as this user")
	password := flag.String("password", os.Getenv("INGESTION_PASSWORD"), "the user's password (default $INGESTION_PASSWORD)")
	mbox := flag.String("mbox", "", "the mbox file, relative to the server's IMPORT_ROOT (or absolute inside it)")
	serviceConfig := flag.String("service-config", "proto/ingestion/v1/ingestion_service_config.json", "gRPC service config (timeouts, retries)")
	wait := flag.Duration("wait", 10*time.Minute, "give up following the import after this long")
	flag.Parse()
	if *mbox == "" || *password == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*addr, *email, *password, *mbox, *serviceConfig, *wait); err != nil {
		log.Fatalf("example: %v", err)
	}
}

func run(addr, email, password, mbox, serviceConfig string, wait time.Duration) error {
	config, err := os.ReadFile(serviceConfig)
	if err != nil {
		return fmt.Errorf("service config: %w", err)
	}
	// grpc.WithInsecure: plaintext h2c, as Envoy and the server listen here.
	// (grpc-go 1.34+ also has credentials/insecure; Debian's 1.33 does not.)
	conn, err := grpc.Dial(addr, grpc.WithInsecure(), grpc.WithDefaultServiceConfig(string(config)))
	if err != nil {
		return err
	}
	defer conn.Close()
	fmt.Printf("service config: %s\n", serviceConfig)

	ctx := context.Background()
	login, err := ingestionv1.NewAuthServiceClient(conn).Login(ctx, &ingestionv1.LoginRequest{Email: email, Password: password})
	if err != nil {
		return fmt.Errorf("login: %w", err)
	}
	fmt.Printf("signed in as %s (%s)\n", login.GetUser().GetEmail(), login.GetUser().GetRole())

	keys := ingestionv1.NewApiKeyServiceClient(conn)
	bearer := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+login.GetAccessToken())
	key, err := keys.CreateApiKey(bearer, &ingestionv1.CreateApiKeyRequest{Name: "go example", ExpiresInDays: 1})
	if err != nil {
		return fmt.Errorf("create API key: %w", err)
	}
	fmt.Printf("api key: %s\n", key.GetId())
	// From here on the API key, as a script or a service would use one.
	authed := metadata.AppendToOutgoingContext(ctx, "x-api-key", key.GetKey())
	defer func() {
		if _, err := keys.DeleteApiKey(authed, &ingestionv1.DeleteApiKeyRequest{Id: key.GetId()}); err != nil {
			log.Printf("revoke API key: %v", err)
		}
	}()

	sources := ingestionv1.NewIngestionServiceClient(conn)
	providerConfig, err := structpb.NewStruct(map[string]interface{}{"localFilePath": mbox})
	if err != nil {
		return err
	}
	source, err := sources.CreateIngestionSource(authed, &ingestionv1.CreateIngestionSourceRequest{
		Name:           "go example: " + mbox,
		Provider:       "mbox_import",
		ProviderConfig: providerConfig,
	})
	if err != nil {
		return fmt.Errorf("create source: %w", err)
	}
	fmt.Printf("source: %s %s\n", source.GetId(), source.GetStatus())

	run, err := follow(authed, sources, source.GetId(), wait)
	if err != nil {
		return err
	}
	fmt.Printf("run: %s %s fetched=%d archived=%d already_present=%d skipped=%d failed=%d\n",
		run.GetKind(), run.GetStatus(), run.GetMessagesFetched(), run.GetMessagesArchived(),
		run.GetMessagesAlreadyPresent(), run.GetMessagesSkipped(), run.GetMessagesFailed())

	listed, total, err := listArchived(authed, ingestionv1.NewArchiveServiceClient(conn), source.GetId())
	if err != nil {
		return err
	}
	fmt.Printf("archived: listed=%d total=%d\n", listed, total)

	visible, err := countSources(authed, sources)
	if err != nil {
		return err
	}
	fmt.Printf("sources visible: %d\n", visible)
	return nil
}

// follow polls the source until its run is over and returns that run.
func follow(ctx context.Context, sources ingestionv1.IngestionServiceClient, id string, wait time.Duration) (*ingestionv1.SyncSession, error) {
	deadline := time.Now().Add(wait)
	last := ""
	for {
		source, err := sources.GetIngestionSource(ctx, &ingestionv1.GetIngestionSourceRequest{Id: id})
		if err != nil {
			return nil, fmt.Errorf("get source: %w", err)
		}
		runs, err := sources.ListSyncSessions(ctx, &ingestionv1.ListSyncSessionsRequest{Id: id, PageSize: 1})
		if err != nil {
			return nil, fmt.Errorf("list runs: %w", err)
		}
		var run *ingestionv1.SyncSession
		if len(runs.GetSyncSessions()) > 0 {
			run = runs.GetSyncSessions()[0]
			progress := fmt.Sprintf("progress: %s archived=%d", source.GetStatus(), run.GetMessagesArchived())
			if progress != last {
				fmt.Println(progress)
				last = progress
			}
		}
		status := source.GetStatus()
		if status != "importing" && status != "syncing" && run != nil && run.GetStatus() != "running" {
			fmt.Printf("source: %s %s: %s\n", id, status, source.GetLastSyncStatusMessage())
			return run, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.New("the import did not end in time")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// listArchived counts the source's archived messages, page by page.
func listArchived(ctx context.Context, archive ingestionv1.ArchiveServiceClient, id string) (int, int32, error) {
	listed, total, token := 0, int32(0), ""
	for {
		page, err := archive.ListArchivedEmails(ctx, &ingestionv1.ListArchivedEmailsRequest{SourceId: id, PageSize: 200, PageToken: token})
		if err != nil {
			return 0, 0, fmt.Errorf("list archived emails: %w", err)
		}
		listed += len(page.GetArchivedEmails())
		total = page.GetTotalSize()
		if token = page.GetNextPageToken(); token == "" {
			return listed, total, nil
		}
	}
}

// countSources reads the list of sources: a server stream (a JSON array over REST).
func countSources(ctx context.Context, sources ingestionv1.IngestionServiceClient) (int, error) {
	stream, err := sources.ListIngestionSources(ctx, &ingestionv1.ListIngestionSourcesRequest{})
	if err != nil {
		return 0, err
	}
	count := 0
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return count, nil
		}
		if err != nil {
			return 0, fmt.Errorf("list sources: %w", err)
		}
		count++
	}
}

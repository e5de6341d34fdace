// A small gRPC client of the ingestion service, on the generated stubs in gen/ts
// (npm package @ingestion-grpc/api) and Connect's gRPC transport for Node.
//
// It signs in, creates an API key and uses it from then on, creates an
// mbox_import source from a file in the server's IMPORT_ROOT, follows the
// import until it ends, lists the archived messages, prints the counts and
// revokes the key.
//
//   npm run build --workspace examples/ts
//   INGESTION_PASSWORD=... node examples/ts/dist/main.js --addr localhost:8080 \
//       --email admin@example.com --mbox takeout/all.mbox

import { parseArgs } from "node:util";
import { setTimeout as sleep } from "node:timers/promises";

import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ArchiveService } from "@ingestion-grpc/api/ingestion/v1/archive_service_pb.js";
import { ApiKeyService, AuthService } from "@ingestion-grpc/api/ingestion/v1/auth_service_pb.js";
import { IngestionService } from "@ingestion-grpc/api/ingestion/v1/ingestion_service_pb.js";
import type { SyncSession } from "@ingestion-grpc/api/ingestion/v1/resources_pb.js";

const RUNNING = new Set(["importing", "syncing"]);

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: "localhost:8080" },
      email: { type: "string", default: "admin@example.com" },
      password: { type: "string", default: process.env.INGESTION_PASSWORD ?? "" },
      mbox: { type: "string", default: "" },
      "wait-seconds": { type: "string", default: "600" },
    },
  });
  if (!values.mbox || !values.password) {
    console.error("usage: main.js --mbox PATH_IN_IMPORT_ROOT [--addr HOST:PORT] [--email E] (password: --password or INGESTION_PASSWORD)");
    process.exit(2);
  }

  // gRPC over plaintext HTTP/2 (h2c), as Envoy and the server listen here.
  const transport = createGrpcTransport({ baseUrl: `http://${values.addr}`, defaultTimeoutMs: 30_000 });
  const auth = createClient(AuthService, transport);
  const login = await auth.login({ email: values.email, password: values.password });
  console.log(`signed in as ${login.user?.email} (${login.user?.role})`);

  const keys = createClient(ApiKeyService, transport);
  const key = await keys.createApiKey(
    { name: "ts example", expiresInDays: 1 },
    { headers: { authorization: `Bearer ${login.accessToken}` } },
  );
  console.log(`api key: ${key.id}`);
  // From here on the API key, as a script or a service would use one.
  const withKey = { headers: { "x-api-key": key.key ?? "" } };
  try {
    const sources = createClient(IngestionService, transport);
    const source = await sources.createIngestionSource(
      { name: `ts example: ${values.mbox}`, provider: "mbox_import", providerConfig: { localFilePath: values.mbox } },
      { ...withKey, timeoutMs: 90_000 },
    );
    console.log(`source: ${source.id} ${source.status}`);

    const run = await follow(sources, source.id, withKey, Number(values["wait-seconds"]) * 1000);
    console.log(
      `run: ${run.kind} ${run.status} fetched=${run.messagesFetched} archived=${run.messagesArchived} ` +
        `already_present=${run.messagesAlreadyPresent} skipped=${run.messagesSkipped} failed=${run.messagesFailed}`,
    );

    const archive = createClient(ArchiveService, transport);
    let listed = 0;
    let total = 0;
    let pageToken = "";
    do {
      const page = await archive.listArchivedEmails({ sourceId: source.id, pageSize: 200, pageToken }, withKey);
      listed += page.archivedEmails.length;
      total = page.totalSize;
      pageToken = page.nextPageToken;
    } while (pageToken);
    console.log(`archived: listed=${listed} total=${total}`);

    // The list of sources is a server stream (a JSON array over REST).
    let visible = 0;
    for await (const _ of sources.listIngestionSources({}, withKey)) {
      visible++;
    }
    console.log(`sources visible: ${visible}`);
  } finally {
    await keys.deleteApiKey({ id: key.id }, withKey);
  }
}

/** Poll the source until its run is over; that run. */
async function follow(
  sources: Client<typeof IngestionService>,
  id: string,
  options: { headers: Record<string, string> },
  waitMs: number,
): Promise<SyncSession> {
  const deadline = Date.now() + waitMs;
  let last = "";
  for (;;) {
    const source = await sources.getIngestionSource({ id }, options);
    const [run] = (await sources.listSyncSessions({ id, pageSize: 1 }, options)).syncSessions;
    if (run !== undefined) {
      const progress = `progress: ${source.status} archived=${run.messagesArchived}`;
      if (progress !== last) {
        console.log(progress);
        last = progress;
      }
      if (!RUNNING.has(source.status) && run.status !== "running") {
        console.log(`source: ${id} ${source.status}: ${source.lastSyncStatusMessage}`);
        return run;
      }
    }
    if (Date.now() > deadline) {
      throw new Error("the import did not end in time");
    }
    await sleep(200);
  }
}

main().catch((error: unknown) => {
  console.error(`example: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
});

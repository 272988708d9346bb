using System.IO.Compression;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text.Json;
using FineTune.Domain.Tenants;

namespace FineTune.Api.Tests.Tenancy;

/// <summary>The per-task registry over HTTP: versions, aliases and their resolution, tags and search, downloads with
/// Range/ETag, soft delete, restore and purge; each change audited.</summary>
public sealed class RegistryTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task<JsonElement> Ok(HttpResponseMessage r)
    {
        var body = await r.Content.ReadAsStringAsync(Ct);
        Assert.True(r.IsSuccessStatusCode, $"{r.RequestMessage?.Method} {r.RequestMessage?.RequestUri} → {(int)r.StatusCode}: {body}");
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    [Fact]
    public async Task Aliases_move_with_audit_and_resolve_task_at_alias_or_version()
    {
        var client = await api.ClientAsync("reg-alias", Roles.Member);
        var v1 = await RegistryData.AddAsync(api, "reg-alias", "support-bot", 1);
        var v2 = await RegistryData.AddAsync(api, "reg-alias", "support-bot", 2);

        var alias = await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/production", new { version = 1 }, Ct));
        Assert.Equal(1, alias.GetProperty("version").GetInt32());
        Assert.Equal(v1.Id, (await Ok(await client.GetAsync("/v1/adapters/support-bot@production", Ct))).GetProperty("id").GetGuid());
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/production", new { version = 2 }, Ct));
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/staging", new { version = 2 }, Ct));
        var resolved = await Ok(await client.GetAsync("/v1/adapters/support-bot@production", Ct));
        Assert.Equal(v2.Id, resolved.GetProperty("id").GetGuid());
        Assert.Equal(["production", "staging"], resolved.GetProperty("aliases").EnumerateArray().Select(a => a.GetString()));
        Assert.Equal("support-bot@v2", resolved.GetProperty("reference").GetString());
        Assert.Equal(v1.Id, (await Ok(await client.GetAsync("/v1/adapters/support-bot@v1", Ct))).GetProperty("id").GetGuid());
        Assert.Equal(v2.Id, (await Ok(await client.GetAsync("/v1/adapters/support-bot@2", Ct))).GetProperty("id").GetGuid());
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync("/v1/adapters/support-bot@canary", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync("/v1/adapters/support-bot@v9", Ct)).StatusCode);

        var task = await Ok(await client.GetAsync("/v1/adapters/tasks/support-bot", Ct));
        Assert.Equal([2, 1], task.GetProperty("versions").EnumerateArray().Select(v => v.GetProperty("version").GetInt32()));
        Assert.Equal(2, task.GetProperty("aliases").GetArrayLength());
        var tasks = await Ok(await client.GetAsync("/v1/adapters/tasks", Ct));
        var summary = tasks.EnumerateArray().Single(t => t.GetProperty("task").GetString() == "support-bot");
        Assert.Equal(2, summary.GetProperty("latestVersion").GetInt32());
        Assert.Equal(2, summary.GetProperty("aliases").GetProperty("production").GetInt32());

        // Bad aliases and targets are refused with the field named.
        var looksLikeVersion = await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/v3", new { version = 1 }, Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, looksLikeVersion.StatusCode);
        Assert.True((await looksLikeVersion.JsonAsync()).GetProperty("errors").TryGetProperty("alias", out _));
        Assert.Equal(HttpStatusCode.NotFound, (await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/production", new { version = 7 }, Ct)).StatusCode);
        var badBody = await client.PutAsJsonAsync("/v1/adapters/tasks/support-bot/aliases/production", new { version = "two" }, Ct);
        Assert.Equal(HttpStatusCode.BadRequest, badBody.StatusCode);
        Assert.True((await badBody.JsonAsync()).GetProperty("errors").TryGetProperty("version", out _));

        // Moving is audited with from → to and the key that did it.
        var admin = await api.ClientAsync("reg-alias-admin");
        var audit = await Ok(await admin.GetAsync($"/v1/audit?tenantId={await api.TenantIdAsync("reg-alias")}&action=alias.moved", Ct));
        var moves = audit.GetProperty("data").EnumerateArray().Select(e => e.GetProperty("data")).ToList();
        Assert.Equal(3, moves.Count);
        Assert.Contains(moves, m => m.GetProperty("alias").GetString() == "production" && m.GetProperty("fromVersion").GetInt32() == 1
            && m.GetProperty("toVersion").GetInt32() == 2);
        Assert.All(audit.GetProperty("data").EnumerateArray(), e => Assert.Equal(JsonValueKind.String, e.GetProperty("actorKeyId").ValueKind));
    }

    [Fact]
    public async Task An_aliased_version_cannot_be_deleted_deletion_is_soft_then_purge_removes_the_files()
    {
        var client = await api.ClientAsync("reg-delete", Roles.Member);
        var v1 = await RegistryData.AddAsync(api, "reg-delete", "summarizer", 1);
        var v2 = await RegistryData.AddAsync(api, "reg-delete", "summarizer", 2);
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/summarizer/aliases/production", new { version = 1 }, Ct));

        var refused = await client.DeleteAsync($"/v1/adapters/{v1.Id}", Ct);
        Assert.Equal(HttpStatusCode.Conflict, refused.StatusCode);
        Assert.Equal("production", (await refused.JsonAsync()).GetProperty("aliases")[0].GetString());
        Assert.Equal(HttpStatusCode.Conflict, (await client.PostAsync($"/v1/adapters/{v2.Id}/purge", null, Ct)).StatusCode); // not deleted yet

        // Move the alias, then v1 may go: hidden from search, downloads 410, still readable by id.
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/summarizer/aliases/production", new { version = 2 }, Ct));
        var deleted = await Ok(await client.DeleteAsync($"/v1/adapters/{v1.Id}", Ct));
        Assert.Equal(JsonValueKind.String, deleted.GetProperty("deletedAt").ValueKind);
        var listed = await Ok(await client.GetAsync("/v1/adapters?task=summarizer", Ct));
        Assert.Equal([v2.Id], listed.GetProperty("data").EnumerateArray().Select(a => a.GetProperty("id").GetGuid()));
        var withDeleted = await Ok(await client.GetAsync("/v1/adapters?task=summarizer&includeDeleted=true", Ct));
        Assert.Equal(2, withDeleted.GetProperty("data").GetArrayLength());
        Assert.Equal(HttpStatusCode.Gone, (await client.GetAsync($"/v1/adapters/{v1.Id}/download", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Gone, (await client.GetAsync($"/v1/adapters/{v1.Id}/files/adapter_config.json", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Conflict, (await client.PutAsJsonAsync("/v1/adapters/tasks/summarizer/aliases/staging", new { version = 1 }, Ct)).StatusCode);

        // Restore brings it back; delete + purge removes its folder and keeps the record (the version number stays taken).
        await Ok(await client.PostAsync($"/v1/adapters/{v1.Id}/restore", null, Ct));
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync($"/v1/adapters/{v1.Id}/files/adapter_config.json", Ct)).StatusCode);
        await Ok(await client.DeleteAsync($"/v1/adapters/{v1.Id}", Ct));
        var folder = Path.Combine(api.ArtifactRoot, v1.Path);
        Assert.True(Directory.Exists(folder));
        var purged = await Ok(await client.PostAsync($"/v1/adapters/{v1.Id}/purge", null, Ct));
        Assert.Equal(JsonValueKind.String, purged.GetProperty("purgedAt").ValueKind);
        Assert.False(Directory.Exists(folder));
        Assert.True(Directory.Exists(Path.Combine(api.ArtifactRoot, v2.Path)));
        Assert.Equal(HttpStatusCode.Conflict, (await client.PostAsync($"/v1/adapters/{v1.Id}/restore", null, Ct)).StatusCode);
        Assert.Equal(1, (await Ok(await client.GetAsync($"/v1/adapters/{v1.Id}", Ct))).GetProperty("version").GetInt32());

        var admin = await api.ClientAsync("reg-delete-admin");
        var actions = (await Ok(await admin.GetAsync($"/v1/audit?tenantId={await api.TenantIdAsync("reg-delete")}", Ct)))
            .GetProperty("data").EnumerateArray().Select(e => e.GetProperty("action").GetString()).ToList();
        Assert.Equal(["adapter.purged", "adapter.deleted", "adapter.restored", "adapter.deleted", "alias.moved", "alias.moved"], actions);
    }

    [Fact]
    public async Task Tags_are_editable_and_search_filters_by_task_base_model_method_tag_and_metric()
    {
        var client = await api.ClientAsync("reg-search", Roles.Member);
        var a = await RegistryData.AddAsync(api, "reg-search", "classifier", 1, method: "lora", baseModel: "llama-1b", finalLoss: 0.9);
        var b = await RegistryData.AddAsync(api, "reg-search", "classifier", 2, method: "bone", baseModel: "llama-1b", finalLoss: 0.4);
        var c = await RegistryData.AddAsync(api, "reg-search", "chat", 1, method: "bone", baseModel: "qwen-0.5b", finalLoss: 1.5);

        var tagged = await Ok(await client.PutAsJsonAsync($"/v1/adapters/{b.Id}/tags", new { tags = new[] { "reviewed", "eval:gsm8k", "reviewed" } }, Ct));
        Assert.Equal(["eval:gsm8k", "reviewed"], tagged.GetProperty("tags").EnumerateArray().Select(t => t.GetString()));
        await Ok(await client.PutAsJsonAsync($"/v1/adapters/{c.Id}/tags", new { tags = new[] { "reviewed" } }, Ct));
        var badTag = await client.PutAsJsonAsync($"/v1/adapters/{c.Id}/tags", new { tags = new[] { "ok", "Not OK" } }, Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, badTag.StatusCode);
        Assert.True((await badTag.JsonAsync()).GetProperty("errors").TryGetProperty("tags[1]", out _));

        async Task<List<Guid>> Search(string query) =>
            [.. (await Ok(await client.GetAsync("/v1/adapters?" + query, Ct))).GetProperty("data").EnumerateArray().Select(x => x.GetProperty("id").GetGuid())];
        Assert.Equal([b.Id, a.Id], await Search("task=classifier"));
        Assert.Equal([b.Id, a.Id], await Search("baseModel=llama-1b"));
        Assert.Equal([c.Id, b.Id], await Search("method=bone"));
        Assert.Equal([c.Id, b.Id], await Search("tag=reviewed"));
        Assert.Equal([b.Id], await Search("tag=reviewed&tag=eval:gsm8k"));
        Assert.Equal([b.Id, a.Id], await Search("metric=finalLoss&max=1.0"));
        Assert.Equal([c.Id, a.Id], await Search("metric=finalLoss&min=0.5"));
        Assert.Equal([b.Id], await Search("method=bone&baseModel=llama-1b&metric=finalLoss&max=1"));
        Assert.Equal(HttpStatusCode.BadRequest, (await client.GetAsync("/v1/adapters?metric=accuracy&min=1", Ct)).StatusCode);

        // Lineage comes with every version.
        var one = await Ok(await client.GetAsync($"/v1/adapters/{b.Id}", Ct));
        var lineage = one.GetProperty("lineage");
        Assert.Equal("llama-1b", lineage.GetProperty("baseModel").GetProperty("name").GetString());
        Assert.Equal(b.BaseModelSha256, lineage.GetProperty("baseModel").GetProperty("sha256").GetString());
        Assert.Equal(b.DatasetSha256, lineage.GetProperty("dataset").GetProperty("sha256").GetString());
        Assert.Equal("bone", lineage.GetProperty("method").GetProperty("type").GetString());
        Assert.Equal(0.4, lineage.GetProperty("metrics").GetProperty("finalLoss").GetDouble());
        Assert.Equal(5, lineage.GetProperty("files").GetArrayLength());
    }

    [Fact]
    public async Task Single_files_download_with_range_etag_if_none_match_and_if_range_and_zips_by_part()
    {
        var client = await api.ClientAsync("reg-download", Roles.Reader);
        var member = await api.ClientAsync("reg-download", Roles.Member);
        var v1 = await RegistryData.AddAsync(api, "reg-download", "extractor", 1, weightBytes: 200_000);
        await Ok(await member.PutAsJsonAsync("/v1/adapters/tasks/extractor/aliases/production", new { version = 1 }, Ct));
        var file = v1.Files.Single(f => f.Path == "lora/adapter_model.safetensors");
        var bytes = await File.ReadAllBytesAsync(RegistryData.FullPath(api, v1, file.Path), Ct);

        // Whole file, by alias: checksum matches the record; ETag is the sha256; Repr-Digest carries it too.
        var url = "/v1/adapters/extractor@production/files/lora/adapter_model.safetensors";
        var whole = await client.GetAsync(url, Ct);
        Assert.Equal(HttpStatusCode.OK, whole.StatusCode);
        var content = await whole.Content.ReadAsByteArrayAsync(Ct);
        Assert.Equal(file.Sha256, Convert.ToHexStringLower(SHA256.HashData(content)));
        Assert.Equal($"\"{file.Sha256}\"", whole.Headers.ETag?.ToString());
        Assert.Equal("bytes", string.Join(",", whole.Headers.AcceptRanges));
        Assert.Equal($"sha-256=:{Convert.ToBase64String(SHA256.HashData(bytes))}:", whole.Headers.GetValues("Repr-Digest").Single());

        // A range, then resuming from where it stopped with If-Range: the pieces make the file.
        var first = new HttpRequestMessage(HttpMethod.Get, url);
        first.Headers.Range = new RangeHeaderValue(0, 65_535);
        var part1 = await client.SendAsync(first, Ct);
        Assert.Equal(HttpStatusCode.PartialContent, part1.StatusCode);
        Assert.Equal($"bytes 0-65535/{bytes.Length}", part1.Content.Headers.ContentRange?.ToString());
        var rest = new HttpRequestMessage(HttpMethod.Get, url);
        rest.Headers.Range = new RangeHeaderValue(65_536, null);
        rest.Headers.IfRange = new RangeConditionHeaderValue(whole.Headers.ETag!);
        var part2 = await client.SendAsync(rest, Ct);
        Assert.Equal(HttpStatusCode.PartialContent, part2.StatusCode);
        byte[] joined = [.. await part1.Content.ReadAsByteArrayAsync(Ct), .. await part2.Content.ReadAsByteArrayAsync(Ct)];
        Assert.Equal(bytes, joined);

        // If-Range with a stale tag: the whole file instead of a wrong piece. If-None-Match: 304. Past the end: 416.
        var stale = new HttpRequestMessage(HttpMethod.Get, url);
        stale.Headers.Range = new RangeHeaderValue(100, 199);
        stale.Headers.IfRange = new RangeConditionHeaderValue(new EntityTagHeaderValue("\"0000\""));
        var full = await client.SendAsync(stale, Ct);
        Assert.Equal(HttpStatusCode.OK, full.StatusCode);
        Assert.Equal(bytes.Length, (await full.Content.ReadAsByteArrayAsync(Ct)).Length);
        var cached = new HttpRequestMessage(HttpMethod.Get, url);
        cached.Headers.IfNoneMatch.Add(whole.Headers.ETag!);
        Assert.Equal(HttpStatusCode.NotModified, (await client.SendAsync(cached, Ct)).StatusCode);
        var beyond = new HttpRequestMessage(HttpMethod.Get, url);
        beyond.Headers.Range = new RangeHeaderValue(bytes.Length + 10, null);
        Assert.Equal(HttpStatusCode.RequestedRangeNotSatisfiable, (await client.SendAsync(beyond, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync($"/v1/adapters/{v1.Id}/files/not-listed.bin", Ct)).StatusCode);

        // Zips: the PEFT-native part leaves lora/ out; the LoRA export unpacks at the zip's root; both match the record.
        async Task<Dictionary<string, string>> Zip(string part)
        {
            var response = await client.GetAsync($"/v1/adapters/{v1.Id}/download?part={part}", Ct);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            using var zip = new ZipArchive(await response.Content.ReadAsStreamAsync(Ct));
            var result = new Dictionary<string, string>();
            foreach (var e in zip.Entries)
            {
                await using var s = e.Open();
                result[e.FullName] = Convert.ToHexStringLower(await SHA256.HashDataAsync(s, Ct));
            }
            return result;
        }
        var peft = await Zip("peft");
        Assert.Equal(["adapter_config.json", "adapter_model.safetensors", "metadata.json"], peft.Keys.Order());
        var lora = await Zip("lora");
        Assert.Equal(["adapter_config.json", "adapter_model.safetensors"], lora.Keys.Order());
        Assert.Equal(file.Sha256, lora["adapter_model.safetensors"]);
        Assert.All(peft, kv => Assert.Equal(v1.Files.Single(f => f.Path == kv.Key).Sha256, kv.Value));
        Assert.Equal(5, (await Zip("all")).Count);

        var zipResponse = await client.GetAsync("/v1/adapters/extractor@production/download?part=lora", Ct);
        var tag = zipResponse.Headers.ETag!;
        Assert.True(tag.IsWeak);
        var again = new HttpRequestMessage(HttpMethod.Get, $"/v1/adapters/{v1.Id}/download?part=lora");
        again.Headers.IfNoneMatch.Add(tag);
        Assert.Equal(HttpStatusCode.NotModified, (await client.SendAsync(again, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.BadRequest, (await client.GetAsync($"/v1/adapters/{v1.Id}/download?part=weights", Ct)).StatusCode);

        // A reader may read and download, not change anything.
        Assert.Equal(HttpStatusCode.Forbidden, (await client.PutAsJsonAsync($"/v1/adapters/{v1.Id}/tags", new { tags = new[] { "x" } }, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await client.DeleteAsync($"/v1/adapters/{v1.Id}", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await client.PutAsJsonAsync("/v1/adapters/tasks/extractor/aliases/staging", new { version = 1 }, Ct)).StatusCode);
    }
}
